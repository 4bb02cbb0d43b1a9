"""Decode-time indexer scoring + exact top-p block selection with a backend choice.

backend "reference": `reference.topp_selection_at` (XLA; scores all [B, R, S] tokens, then block stats).
backend "triton": the fused Pallas scoring + block log-sum-exp kernel (`triton.py`), then the same exact
sort-based top-p on the [B, R, Sb] block masses. None picks triton on GPUs, the reference elsewhere (logged).
Both return the same selection (tested in interpret mode); only the scoring differs in rounding.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from pallas_kernels.block_plan import cdiv
from pallas_kernels.indexer_topp.reference import forced_blocks, topp_select, topp_selection_at
from pallas_kernels.sparse_attention.api import _check_backend

log = logging.getLogger(__name__)


def decode_selection(q_idx, k_idx, kv_len, *, top_p: float, kv_block: int, sinks: int = 0, keep_recent: int = 64,
                     max_blocks: int | None = None, backend: str | None = None, interpret: bool = False,
                     bpp: int = 8):
    """bool [B, R, Sb]: each decode token's top-p blocks.

    q_idx fp32 [B, R, I] (the token at position kv_len - 1), k_idx [B, S, R, I], kv_len int [B].
    """
    if not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if backend is None:
        backend = "triton" if jax.default_backend() in ("gpu", "cuda") else "reference"
        log.info("decode_selection: backend=%s (platform %s)", backend, jax.default_backend())
    if backend not in ("reference", "triton"):
        raise ValueError(f"backend must be 'reference' or 'triton', got {backend!r}")
    _check_backend(backend, interpret)
    kv_len = jnp.asarray(kv_len, jnp.int32)
    b, s = k_idx.shape[:2]
    if backend == "reference":
        return topp_selection_at(q_idx[:, None], k_idx, (kv_len - 1)[:, None], kv_len, top_p=top_p, tile=1,
                                 kv_block=kv_block, sinks=sinks, keep_recent=keep_recent, max_blocks=max_blocks)[:, :, 0]
    from pallas_kernels.indexer_topp.triton import block_lse_triton

    sb = cdiv(s, kv_block)
    sp = cdiv(s, kv_block * bpp) * kv_block * bpp
    kp = jnp.pad(k_idx, ((0, 0), (0, sp - s), (0, 0), (0, 0)))
    lse = block_lse_triton(q_idx, kp, kv_len, kv_block=kv_block, bpp=bpp, interpret=interpret)[..., :sb]
    tot = jax.nn.logsumexp(lse, axis=-1, keepdims=True)
    mass = jnp.where(jnp.isfinite(lse), jnp.exp(lse - jnp.where(jnp.isfinite(tot), tot, 0.0)), 0.0)
    forced = forced_blocks(kv_len - 1, kv_len - 1, sb, kv_block, sinks, keep_recent)[:, None]  # [B, 1, Sb]
    return topp_select(mass, jnp.isfinite(lse), forced, top_p, max_blocks)
