"""Decode top-p selection + DecodePlan packing in one Pallas kernel (Triton lowering), sort-free and exact.

One program per (sequence, GQA group). It loads the group's G rows of block log-sum-exps [G, Sb] (from the
fused scoring kernel, `triton.py`) and, per head:
- retrieval head: block masses (softmax over visible blocks), forced blocks (sinks, the last `keep_recent`
  tokens), then the exact top-p set without a sort: a 30-step bisection on the fp32 bit pattern of the
  candidates' masses (non-negative floats order like their int32 bits) finds the boundary value tau = the
  largest mass v with  base + sum(mass >= v) >= p;  everything above tau is kept, and ties at tau are kept
  in index order while the running mass stays below p (the sort-based reference's stable-order rule);
- local head: its sink + window band at the decode position.
The group's union of blocks is then packed in ascending order by a prefix sum and one permutation scatter,
with the per-head mask, so only the DecodePlan arrays leave the kernel.

This kernel fuses plan building (selection, the role merge, the local band, packing) for speed, outside the
one planner (`rtpurbo_jax.planner`); `tests/test_planner.py` pins its plans to the planner's
`decode_step_plan` with the reference selection. Masses are summed in a different order than the
reference's sorted cumsum, so a block whose running mass lands within float rounding of p can differ; with
exactly representable masses (tests) the selection is identical.

Layout: lse fp32 [B, N, Sbp] with Sbp a power of two (the api pads with -inf), heads of group k at rows
k*G .. k*G+G-1, G a power of two. Memory per program: a few [G, Sbp] fp32 arrays in registers (Sbp = 2048 at
128K tokens with 64-token blocks; 1M tokens would spill).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

_ONE_PLUS = 0x3F800001  # int32 bits just above 1.0f: no block mass reaches it
_STEPS = 30  # 2**30 > _ONE_PLUS: the bisection interval closes


def _kernel(kvlen_ref, isr_ref, sinks_ref, win_ref, dense_ref, lse_ref, blocks_ref, counts_ref, hm_ref, *,
            top_p: float, kv_block: int, g: int, r_sinks: int, keep_recent: int, num_kv: int):
    b, kg = pl.program_id(0), pl.program_id(1)
    q_pos = kvlen_ref[b] - 1
    lse = lse_ref[...]  # [G, Sbp]
    sbp = lse.shape[-1]
    blk = lax.broadcasted_iota(jnp.int32, (g, sbp), 1)
    k_lo = blk * kv_block
    k_hi = k_lo + (kv_block - 1)
    causal = k_lo <= q_pos

    vis = (lse > -jnp.inf) & causal
    all_visible = dense_ref[b] != 0  # below seqlen_threshold: retrieval heads keep every visible block
    m = jnp.where(vis, lse, -1e30).max(axis=1)
    e = jnp.where(vis, jnp.exp(lse - m[:, None]), 0.0)
    l = e.sum(axis=1)
    mass = e / jnp.where(l > 0, l, 1.0)[:, None]
    forced = vis & ((k_lo < r_sinks) | (k_hi > q_pos - max(keep_recent, 1)))
    if top_p >= 1.0:
        sel_r = vis
    else:
        base = jnp.where(forced, mass, 0.0).sum(axis=1)  # [G]
        is_cand = vis & ~forced
        cand = jnp.where(is_cand, mass, 0.0)
        bits = jnp.where(is_cand, lax.bitcast_convert_type(cand, jnp.int32), -1)
        total = base + cand.sum(axis=1)

        def bisect(_, lohi):
            lo, hi = lohi
            mid = lo + (hi - lo) // 2
            ok = base + jnp.where(bits >= mid[:, None], cand, 0.0).sum(axis=1) >= top_p
            return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

        lo0 = jnp.zeros((g,), jnp.int32)
        tau_bits, _ = lax.fori_loop(0, _STEPS, bisect, (lo0, lo0 + _ONE_PLUS))
        tau = lax.bitcast_convert_type(tau_bits, jnp.float32)
        above = bits > tau_bits[:, None]
        s_gt = jnp.where(above, cand, 0.0).sum(axis=1)
        tie = bits == tau_bits[:, None]
        rank = jnp.cumsum(tie.astype(jnp.int32), axis=1) - 1
        keep_tie = tie & ((base + s_gt)[:, None] + rank.astype(jnp.float32) * tau[:, None] < top_p)
        keep = jnp.where((total < top_p)[:, None], is_cand,
                         (base < top_p)[:, None] & (above | keep_tie))
        sel_r = jnp.where(all_visible, vis, forced | keep)

    heads = kg * g + lax.broadcasted_iota(jnp.int32, (g,), 0)
    is_r = isr_ref[heads] != 0
    sinks, window = sinks_ref[heads], win_ref[heads]
    sel_l = causal & ((k_lo < sinks[:, None]) | (k_hi > q_pos - window[:, None]))
    sel = jnp.where(is_r[:, None], sel_r, sel_l)  # [G, Sbp]

    union = sel.astype(jnp.int32).max(axis=0) > 0  # [Sbp]
    ids = lax.broadcasted_iota(jnp.int32, (sbp,), 0)
    incl = jnp.cumsum(union.astype(jnp.int32))
    count = union.astype(jnp.int32).sum()
    last = jnp.where(union, ids, 0).max()
    # a permutation of 0..Sbp-1: union blocks to slots [0, count) in ascending order, the others after them in
    # order, so one unmasked scatter writes every slot exactly once (padding slots get `last` / no heads)
    slot = jnp.where(union, incl - 1, count + ids - incl)
    pltriton.store(blocks_ref.at[slot], jnp.where(union, ids, last))
    head_row = lax.broadcasted_iota(jnp.int32, (g, sbp), 0)
    for h in range(g):  # row h without a slice (the Triton lowering has none): a masked max over the group
        sel_h = jnp.where(head_row == h, sel.astype(jnp.int32), 0).max(axis=0)
        pltriton.store(hm_ref.at[h, slot], sel_h)
    counts_ref[b * num_kv + kg] = count


@functools.partial(jax.jit, static_argnames=("num_kv_heads", "top_p", "kv_block", "sinks", "keep_recent",
                                             "num_warps", "interpret"))
def decode_plan_triton(lse, is_retrieval, head_sinks, head_window, kv_len, dense, *, num_kv_heads: int,
                       top_p: float, kv_block: int, sinks: int, keep_recent: int, num_warps: int = 8,
                       interpret: bool = False):
    """(kv_blocks int32 [B, K, Sbp], counts int32 [B, K], head_mask int32 [B, K, G, Sbp]).

    lse fp32 [B, N, Sbp] (rows of local heads are ignored); is_retrieval int32 [N]; head_sinks / head_window
    int32 [N] (local heads' band); kv_len int32 [B]; dense int32 [B] (1: retrieval heads keep every visible
    block); sinks / keep_recent: the retrieval heads' forced blocks.
    """
    b, n, sbp = lse.shape
    g = n // num_kv_heads
    if sbp & (sbp - 1) or g & (g - 1):
        raise ValueError(f"Sbp={sbp} and G={g} must be powers of two (the api pads Sbp)")
    whole = lambda x: pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)
    scalars = [jnp.asarray(x, jnp.int32) for x in (kv_len, is_retrieval, head_sinks, head_window, dense)]
    kernel = functools.partial(_kernel, top_p=float(top_p), kv_block=kv_block, g=g, r_sinks=sinks,
                               keep_recent=keep_recent, num_kv=num_kv_heads)
    blocks, counts, hm = pl.pallas_call(
        kernel, grid=(b, num_kv_heads),
        in_specs=[whole(x) for x in scalars] + [pl.BlockSpec((None, g, sbp), lambda bi, ki: (bi, ki, 0))],
        out_specs=[pl.BlockSpec((None, None, sbp), lambda bi, ki: (bi, ki, 0)),
                   pl.BlockSpec((b * num_kv_heads,), lambda *_: (0,)),
                   pl.BlockSpec((None, None, g, sbp), lambda bi, ki: (bi, ki, 0, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, num_kv_heads, sbp), jnp.int32),
                   jax.ShapeDtypeStruct((b * num_kv_heads,), jnp.int32),
                   jax.ShapeDtypeStruct((b, num_kv_heads, g, sbp), jnp.int32)],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret, name="rtpurbo_decode_topp_plan",
    )(*scalars, lse.astype(jnp.float32))
    return blocks, counts.reshape(b, num_kv_heads), hm
