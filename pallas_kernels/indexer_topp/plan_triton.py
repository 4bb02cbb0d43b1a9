"""Decode top-p selection + DecodePlan packing in two Pallas kernels (Triton lowering), sort-free and exact.

**Selection** (`rtpurbo_decode_topp_select`), one program per (sequence, query head) over that head's row of
block log-sum-exps [Sbp] (from the fused scoring kernel, `triton.py`):
- retrieval head: block masses (softmax over visible blocks), forced blocks (sinks, the last `keep_recent`
  tokens), then the exact top-p set without a sort (`xla.topp_select_sortfree`, run on the row): a 30-step
  bisection on the fp32 bit pattern of the
  candidates' masses (non-negative floats order like their int32 bits) finds the boundary value tau = the
  largest mass v with  base + sum(mass >= v) >= p;  everything above tau is kept, and ties at tau are kept
  in index order while the running mass stays below p (the sort-based reference's stable-order rule);
- local head: its sink + window band at the decode position (no bisection: `pl.when` skips it).
**Packing** (`rtpurbo_decode_topp_plan`), one program per (sequence, GQA group, chunk of `chunk` blocks): the
group's union of blocks is packed in ascending order by a prefix sum and one permutation scatter, with the
per-head mask. The chunk's offset among the union blocks (an exclusive prefix sum of per-chunk union counts),
the union's size and its last block come from one small XLA reduction between the two kernels.

Why two kernels and not one per group (the first version): a group's [G, Sbp] rows held in registers spill
past Sbp ~ 4096 (at 512K tokens one program per group took 0.9 ms on an H200, 15x the 128K time). A row per
program with warps scaled to Sbp, and packing spread over chunks, keep every program's arrays small.

These kernels fuse plan building (selection, the role merge, the local band, packing) for speed, outside the
one planner (`rtpurbo_jax.planner`); `tests/test_planner.py` pins their plans to the planner's `decode_plan`
with the reference selection. Masses are summed in a different order than the reference's sorted cumsum, so
a block whose running mass lands within float rounding of p can differ; with exactly representable masses
(tests) the selection is identical.

Layout: lse fp32 [B, N, Sbp] with Sbp a power of two (the api pads with -inf), heads of group k at rows
k*G .. k*G+G-1, G a power of two.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.indexer_topp.xla import topp_select_sortfree

def _select_kernel(kvlen_ref, isr_ref, sinks_ref, win_ref, dense_ref, lse_ref, sel_ref, *, top_p: float,
                   kv_block: int, r_sinks: int, keep_recent: int):
    b, n = pl.program_id(0), pl.program_id(1)
    q_pos = kvlen_ref[b] - 1
    sbp = sel_ref.shape[-1]
    k_lo = lax.broadcasted_iota(jnp.int32, (sbp,), 0) * kv_block
    k_hi = k_lo + (kv_block - 1)
    causal = k_lo <= q_pos
    is_r = isr_ref[n] != 0

    @pl.when(is_r)
    def _retrieval():
        lse = lse_ref[...]  # [Sbp]
        vis = (lse > -jnp.inf) & causal
        m = jnp.max(jnp.where(vis, lse, -1e30))
        e = jnp.where(vis, jnp.exp(lse - m), 0.0)
        l = jnp.sum(e)
        mass = e / jnp.where(l > 0, l, 1.0)
        forced = vis & ((k_lo < r_sinks) | (k_hi > q_pos - max(keep_recent, 1)))
        # the XLA backend's bisection, on this program's row (one jnp function, lowered by Triton here)
        sel = jnp.where(dense_ref[b] != 0, vis, topp_select_sortfree(mass, vis, forced, top_p))
        sel_ref[...] = sel.astype(jnp.int32)

    @pl.when(jnp.logical_not(is_r))
    def _local():
        band = causal & ((k_lo < sinks_ref[n]) | (k_hi > q_pos - win_ref[n]))
        sel_ref[...] = band.astype(jnp.int32)


def _pack_kernel(before_ref, total_ref, last_ref, sel_ref, blocks_ref, hm_ref, *, g: int, chunk: int,
                 num_kv: int, chunks: int):
    b, kg, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    row = b * num_kv + kg
    sel = sel_ref[...]  # [G, chunk] int32
    union = jnp.max(sel, axis=0) > 0  # [chunk]
    local = lax.broadcasted_iota(jnp.int32, (chunk,), 0)
    ids = c * chunk + local
    incl = jnp.cumsum(union.astype(jnp.int32))
    u_before = before_ref[row * chunks + c]
    nu_before = c * chunk - u_before
    # a permutation of 0..Sbp-1 over the whole row: union blocks to slots [0, total) in ascending order, the
    # others after them in order, so unmasked scatters write every slot exactly once (padding slots: `last`)
    slot = jnp.where(union, u_before + incl - 1, total_ref[row] + nu_before + local - incl)
    pltriton.store(blocks_ref.at[slot], jnp.where(union, ids, last_ref[row]))
    head_row = lax.broadcasted_iota(jnp.int32, (g, chunk), 0)
    for h in range(g):  # row h without a slice (the Triton lowering has none): a masked max over the group
        pltriton.store(hm_ref.at[h, slot], jnp.max(jnp.where(head_row == h, sel, 0), axis=0))


def select_warps(sbp: int) -> int:
    """Warps of a selection program: enough that a row of Sbp fp32 stays ~16 values per thread (4 to 16)."""
    return int(min(16, max(4, sbp // 512)))


@functools.partial(jax.jit, static_argnames=("num_kv_heads", "top_p", "kv_block", "sinks", "keep_recent",
                                             "chunk", "interpret"))
def decode_plan_triton(lse, is_retrieval, head_sinks, head_window, kv_len, dense, *, num_kv_heads: int,
                       top_p: float, kv_block: int, sinks: int, keep_recent: int, chunk: int = 1024,
                       interpret: bool = False):
    """(kv_blocks int32 [B, K, Sbp], counts int32 [B, K], head_mask int32 [B, K, G, Sbp]).

    lse fp32 [B, N, Sbp] (rows of local heads are ignored); is_retrieval int32 [N]; head_sinks / head_window
    int32 [N] (local heads' band); kv_len int32 [B]; dense int32 [B] (1: retrieval heads keep every visible
    block); sinks / keep_recent: the retrieval heads' forced blocks; chunk: blocks per packing program.
    """
    b, n, sbp = lse.shape
    g = n // num_kv_heads
    if sbp & (sbp - 1) or g & (g - 1):
        raise ValueError(f"Sbp={sbp} and G={g} must be powers of two (the api pads Sbp)")
    ch = min(chunk, sbp)
    nch = sbp // ch
    whole = lambda x: pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)
    scalars = [jnp.asarray(x, jnp.int32) for x in (kv_len, is_retrieval, head_sinks, head_window, dense)]
    sel = pl.pallas_call(
        functools.partial(_select_kernel, top_p=float(top_p), kv_block=kv_block, r_sinks=sinks,
                          keep_recent=keep_recent),
        grid=(b, n),
        in_specs=[whole(x) for x in scalars] + [pl.BlockSpec((None, None, sbp), lambda bi, ni: (bi, ni, 0))],
        out_specs=pl.BlockSpec((None, None, sbp), lambda bi, ni: (bi, ni, 0)),
        out_shape=jax.ShapeDtypeStruct((b, n, sbp), jnp.int32),
        compiler_params=pltriton.CompilerParams(num_warps=select_warps(sbp), num_stages=1),
        interpret=interpret, name="rtpurbo_decode_topp_select",
    )(*scalars, lse.astype(jnp.float32))
    union = sel.reshape(b, num_kv_heads, g, sbp).max(2) > 0  # [B, K, Sbp]
    per_chunk = union.reshape(b, num_kv_heads, nch, ch).sum(-1, dtype=jnp.int32)
    before = (jnp.cumsum(per_chunk, -1) - per_chunk).reshape(-1)
    counts = per_chunk.sum(-1)
    last = jnp.where(union, jnp.arange(sbp, dtype=jnp.int32), 0).max(-1)
    aux = [before, counts.reshape(-1), last.reshape(-1)]
    blocks, hm = pl.pallas_call(
        functools.partial(_pack_kernel, g=g, chunk=ch, num_kv=num_kv_heads, chunks=nch),
        grid=(b, num_kv_heads, nch),
        in_specs=[whole(x) for x in aux] + [pl.BlockSpec((None, g, ch), lambda bi, ki, ci: (bi, ki, ci))],
        out_specs=[pl.BlockSpec((None, None, sbp), lambda bi, ki, ci: (bi, ki, 0)),
                   pl.BlockSpec((None, None, g, sbp), lambda bi, ki, ci: (bi, ki, 0, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, num_kv_heads, sbp), jnp.int32),
                   jax.ShapeDtypeStruct((b, num_kv_heads, g, sbp), jnp.int32)],
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret, name="rtpurbo_decode_topp_plan",
    )(*aux, sel)
    return blocks, counts, hm
