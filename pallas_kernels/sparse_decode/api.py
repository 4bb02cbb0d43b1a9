"""Public API: sparse decode attention over a DecodePlan, with an explicit backend choice.

backend: "reference" | "triton" (Pallas Triton lowering, GPU, split-K) | "mosaic_tpu". None picks the best for
the default device and logs it; a named backend that cannot run raises (no silent fallback). interpret=True
runs a Pallas backend in interpret mode (CPU tests). The cache length is padded to whole blocks here.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from pallas_kernels.block_plan import cdiv, check_inputs, check_plan_values
from pallas_kernels.sparse_attention.api import _check_backend
from pallas_kernels.sparse_decode import reference
from pallas_kernels.sparse_decode.plan import DecodePlan

log = logging.getLogger(__name__)
BACKENDS = ("reference", "triton", "mosaic_tpu")


def default_backend(platform: str | None = None) -> str:
    """The backend None resolves to: triton on GPUs, mosaic_tpu on TPUs, the reference elsewhere."""
    platform = platform or jax.default_backend()
    return {"gpu": "triton", "cuda": "triton", "tpu": "mosaic_tpu"}.get(platform, "reference")


def sparse_decode_attention(q, k, v, plan: DecodePlan, *, layer=None, backend: str | None = None,
                            interpret: bool = False, scale=None, splits: int | None = None):
    """q [B, N, H] (the token at kv_len - 1), k / v [B, S, K, H] -> (out [B, N, H] q.dtype, lse fp32 [B, N]).

    layer: None, or int32 [] (may be traced) — then k / v are a stacked cache [L, B, S, K, H] and the call
    attends over layer `layer` (a scanned layer): the triton backend reads it in place; the others take the
    slice (a copy), as does triton when S is not a multiple of kv_block.
    Inputs must be floating point; outside jit the plan's block ids, counts and kv_len are range-checked."""
    stacked = layer is not None
    if (q.ndim != 3 or k.ndim != 4 + stacked or k.shape != v.shape or q.shape[1] % k.shape[-2]
            or q.shape[-1] != k.shape[-1] or (stacked and k.shape[1] != q.shape[0])):
        raise ValueError(f"q must be [B, N, H] and k, v [{'L, ' if stacked else ''}B, S, K, H] with N a multiple of K;"
                         f" got {q.shape}, {k.shape}, {v.shape}")
    check_inputs(q, k, v, "sparse_decode_attention")
    s = k.shape[-3]
    check_plan_values(plan.kv_blocks, plan.counts, plan.kv_len, cdiv(s, plan.kv_block), s,
                      "sparse_decode_attention plan")
    if backend is None:
        backend = default_backend()
        log.info("sparse_decode_attention: backend=%s (platform %s)", backend, jax.default_backend())
    if backend not in BACKENDS:  # a named backend is honoured or refused, never swapped for another
        raise ValueError(f"sparse_decode_attention: backend must be one of {BACKENDS}, got {backend!r}")
    _check_backend(backend, interpret, q)
    if stacked and backend == "triton" and s % plan.kv_block == 0:
        from pallas_kernels.sparse_decode.triton import sparse_decode_triton

        return sparse_decode_triton(q, k, v, plan, layer=layer, scale=scale, splits=splits, interpret=interpret)
    if stacked:
        k, v = (jax.lax.dynamic_index_in_dim(x, layer, keepdims=False) for x in (k, v))
    if backend == "reference":
        return reference.sparse_decode_attention(q, k, v, plan, scale)
    sp = cdiv(s, plan.kv_block) * plan.kv_block
    k, v = (jnp.pad(x, ((0, 0), (0, sp - s), (0, 0), (0, 0))) for x in (k, v))
    if backend == "triton":
        from pallas_kernels.sparse_decode.triton import sparse_decode_triton

        return sparse_decode_triton(q, k, v, plan, scale=scale, splits=splits, interpret=interpret)
    from pallas_kernels.sparse_decode.mosaic_tpu import sparse_decode_tpu

    hm = lambda x: jnp.swapaxes(x, 1, 2)
    return sparse_decode_tpu(q, hm(k), hm(v), plan, scale=scale, splits=splits, interpret=interpret)


def sparse_decode_tokens(q, k, v, plan: DecodePlan, *, backend: str | None = None, interpret: bool = False,
                         scale=None, splits: int | None = None):
    """A few query tokens per sequence (chunked or speculative decoding) in one call.

    q [B, C, N, H]: tokens at positions kv_len - C .. kv_len - 1; `plan` over the N·C folded rows
    (`plan.fold_tokens` order, `q_shift = plan.token_shifts(N, C)`); each GQA group reads its union once for
    all G·C rows. Returns out [B, C, N, H] (q.dtype), lse fp32 [B, C, N].
    """
    from pallas_kernels.sparse_decode.plan import fold_tokens, unfold_tokens

    b, c, n, h = q.shape
    kh = k.shape[2]
    out, lse = sparse_decode_attention(fold_tokens(q, kh), k, v, plan, backend=backend, interpret=interpret,
                                       scale=scale, splits=splits)
    return unfold_tokens(out, c, kh), unfold_tokens(lse, c, kh)
