"""Decode top-p selection in XLA without a sort (backend "xla": the TPU default, any platform).

The exact top-p set of `reference.topp_select` (without `max_blocks`) by bisection, batched over rows (the
Triton selection kernel, `plan_triton.py`, runs this same function on its row): non-negative fp32 masses order like their int32 bit patterns, so 30
halvings of [0, bits(1.0)] find tau = the largest mass v with  base + sum(mass >= v) >= p;  masses above tau
are kept and ties at tau in index order while the running mass stays below p (the stable sort's order). Each
step is one masked row sum: no sort (XLA sorts are slow on TPUs) and no data-dependent shapes. Masses are summed
in another order than the reference's sorted cumsum, so a block whose running mass lands within float
rounding of p can differ; with exactly representable masses the sets are identical (tested).

Scoring stays in XLA too: token scores q_idx · k_idx, per-block log-sum-exp (`reference.block_stats`).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.indexer_topp.reference import block_stats

_ONE_PLUS = 0x3F800001  # int32 bits just above 1.0f: no block mass reaches it
_STEPS = 30  # 2**30 > _ONE_PLUS: the bisection interval closes


def topp_select_sortfree(mass, visible, forced, top_p: float):
    """bool [..., Sb]: `reference.topp_select(mass, visible, forced, top_p)` without a sort.

    mass fp32 [..., Sb] (probabilities over the visible blocks), visible / forced bool [..., Sb]."""
    forced = forced & visible
    if top_p >= 1.0:
        return visible
    base = jnp.where(forced, mass, 0.0).sum(-1)
    is_cand = visible & ~forced
    cand = jnp.where(is_cand, mass, 0.0)
    bits = jnp.where(is_cand, lax.bitcast_convert_type(cand, jnp.int32), -1)
    total = base + cand.sum(-1)

    def bisect(_, lohi):
        lo, hi = lohi
        mid = lo + (hi - lo) // 2
        ok = base + jnp.where(bits >= mid[..., None], cand, 0.0).sum(-1) >= top_p
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    zero = jnp.zeros(base.shape, jnp.int32)
    tau_bits, _ = lax.fori_loop(0, _STEPS, bisect, (zero, zero + _ONE_PLUS))
    tau = lax.bitcast_convert_type(tau_bits, jnp.float32)[..., None]
    above = bits > tau_bits[..., None]
    s_gt = jnp.where(above, cand, 0.0).sum(-1, keepdims=True)
    tie = bits == tau_bits[..., None]
    rank = jnp.cumsum(tie.astype(jnp.int32), axis=-1) - 1
    keep_tie = tie & (base[..., None] + s_gt + rank.astype(jnp.float32) * tau < top_p)
    keep = jnp.where((total < top_p)[..., None], is_cand, (base < top_p)[..., None] & (above | keep_tie))
    return forced | keep


def block_lse_xla(q_idx, k_idx, kv_len, kv_block: int, key_slot=None):
    """fp32 [B, R, Sb]: per-block log-sum-exp of the decode token's index scores (-inf where no key is visible).

    q_idx fp32 [B, R, I], k_idx [B, S, R, I], kv_len int [B]. key_slot: None, or static int [R] — k_idx holds K
    shared slots [B, S, K, I]; each head's query is placed at its slot (zeros elsewhere) and contracted over slots
    and I, so the keys are read as stored, with no per-head copy (K x the multiplies, I = 16 of them per key)."""
    if key_slot is not None:
        onehot = jnp.asarray(np.eye(k_idx.shape[-2], dtype=np.float32)[np.asarray(key_slot)])  # [R, K]
        scores = jnp.einsum("brki,bski->brs", q_idx[:, :, None, :] * onehot[None, :, :, None],
                            k_idx.astype(jnp.float32), precision=lax.Precision.HIGHEST)
    else:
        scores = jnp.einsum("bri,bsri->brs", q_idx, k_idx.astype(jnp.float32), precision=lax.Precision.HIGHEST)
    visible = jnp.arange(k_idx.shape[1])[None, None] < jnp.asarray(kv_len, jnp.int32)[:, None, None]
    return block_stats(scores, visible, kv_block)[1]
