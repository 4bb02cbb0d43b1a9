"""The backward of block-sparse flash attention, Pallas with the Triton lowering: the "triton" backend's VJP.

Two kernels (FlashAttention-2's split; two kernels in one file because they are one backward):
- **dq**, grid (Tb, B, N) like the forward: a query tile walks its plan's key blocks, recomputes the
  probabilities from the forward's log-sum-exp and accumulates dq = sum_j dS_j K_j (registers, fp32).
- **dk / dv**, grid (Sb, B, N): a key block walks the query tiles that visit it — the plan transposed
  (`transpose_plan`: per (sequence, head, key block) the ascending list of tiles) — and accumulates
  dv = sum_t P_t^T dO_t and dk = sum_t dS_t^T Q_t for that query head; the heads of a KV group are summed after.
dS = P * (dP - delta) with delta = rowsum(dO * O) - dlse (computed in XLA), and the same token visibility as
the forward (causal, padding, sinks, window). Layouts as the forward (T, S multiples of the plan's blocks).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.block_plan import BlockPlan, kernel_plan_args, pack_ascending, zero_cotangent


def transpose_plan(plan: BlockPlan, num_kv_blocks: int) -> tuple[jax.Array, jax.Array]:
    """(tiles int32 [B, N, Sb, Tb], counts int32 [B, N, Sb]): for each key block, the query tiles whose plan
    holds it, ascending (a scatter of the plan's entries, O(B·N·Tb·M), then a sort-free packing)."""
    b, n, tb, m = plan.kv_blocks.shape
    valid = jnp.arange(m) < plan.counts[..., None]
    ids = jnp.where(valid, plan.kv_blocks, num_kv_blocks)  # invalid entries -> dropped
    bi, ni, ti = jnp.ix_(jnp.arange(b), jnp.arange(n), jnp.arange(tb))
    sel_t = jnp.zeros((b, n, num_kv_blocks, tb), bool).at[bi[..., None], ni[..., None], ids, ti[..., None]].set(
        True, mode="drop")
    return pack_ascending(sel_t, tb)


def _visible(q_pos, k_pos, sink, window, kv_len):
    return (k_pos <= q_pos) & (k_pos < kv_len) & ((k_pos < sink) | (q_pos - k_pos < window))


def _probs(q, k, lse, q_pos, k_pos, sink, window, kv_len, scale):
    """fp32 [bq, bk]: the forward's probabilities of a (query tile, key block) pair, 0 where not visible."""
    s = pltriton.dot(q, k, trans_b=True) * scale
    vis = _visible(q_pos, k_pos, sink, window, kv_len) & (lse[:, None] > -jnp.inf)
    return jnp.where(vis, jnp.exp(s - jnp.where(vis, lse[:, None], 0.0)), 0.0)


def _dq_kernel(blocks_ref, counts_ref, sinks_ref, window_ref, kvlen_ref, qstart_ref, q_ref, k_ref, v_ref, do_ref,
               lse_ref, delta_ref, dq_ref, *, scale: float, q_block: int, kv_block: int, num_heads: int,
               num_tiles: int, m_max: int):
    t, b, n = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    row = (b * num_heads + n) * num_tiles + t
    sink, window, kv_len = sinks_ref[n], window_ref[n], kvlen_ref[b]
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    q_pos = qstart_ref[b] + t * q_block + lax.broadcasted_iota(jnp.int32, (q_block, kv_block), 0)

    def body(j, dq):
        start = pl.multiple_of(blocks_ref[row * m_max + j] * kv_block, kv_block)
        k, v = k_ref[pl.ds(start, kv_block), :], v_ref[pl.ds(start, kv_block), :]
        k_pos = start + lax.broadcasted_iota(jnp.int32, (q_block, kv_block), 1)
        p = _probs(q, k, lse, q_pos, k_pos, sink, window, kv_len, scale)
        ds = p * (pltriton.dot(do, v, trans_b=True) - delta[:, None])
        return dq + pltriton.dot(ds.astype(k.dtype), k) * scale

    dq_ref[...] = lax.fori_loop(0, counts_ref[row], body, jnp.zeros(q.shape, jnp.float32))


def _dkdv_kernel(tiles_ref, tcounts_ref, sinks_ref, window_ref, kvlen_ref, qstart_ref, q_ref, k_ref, v_ref, do_ref,
                 lse_ref, delta_ref, dk_ref, dv_ref, *, scale: float, q_block: int, kv_block: int, num_heads: int,
                 num_kv_blocks: int, num_tiles: int):
    j, b, n = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    row = (b * num_heads + n) * num_kv_blocks + j
    sink, window, kv_len = sinks_ref[n], window_ref[n], kvlen_ref[b]
    k, v = k_ref[...], v_ref[...]
    k_pos = j * kv_block + lax.broadcasted_iota(jnp.int32, (q_block, kv_block), 1)

    def body(i, carry):
        dk, dv = carry
        start = pl.multiple_of(tiles_ref[row * num_tiles + i] * q_block, q_block)
        q, do = q_ref[pl.ds(start, q_block), :], do_ref[pl.ds(start, q_block), :]
        lse, delta = lse_ref[pl.ds(start, q_block)], delta_ref[pl.ds(start, q_block)]
        q_pos = qstart_ref[b] + start + lax.broadcasted_iota(jnp.int32, (q_block, kv_block), 0)
        p = _probs(q, k, lse, q_pos, k_pos, sink, window, kv_len, scale)
        dv = dv + pltriton.dot(p.astype(do.dtype), do, trans_a=True)
        ds = p * (pltriton.dot(do, v, trans_b=True) - delta[:, None])
        return dk + pltriton.dot(ds.astype(q.dtype), q, trans_a=True) * scale, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, tcounts_ref[row], body, (zeros, zeros))
    dk_ref[...], dv_ref[...] = dk, dv


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "num_warps", "num_stages"))
def block_sparse_attention_triton_bwd(q, k, v, plan: BlockPlan, out, lse, d_out, d_lse, *, scale: float,
                                      interpret: bool = False, num_warps: int | None = None, num_stages: int = 2):
    """(dq [B, T, N, H], dk, dv [B, S, K, H]) in the inputs' dtypes for the forward's out [B, T, N, H], lse fp32
    [B, N, T] and their cotangents; T and S multiples of the plan's blocks (`api.py` pads)."""
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    bq, bk = plan.q_block, plan.kv_block
    tb, sb, g = t // bq, s // bk, n // kh
    plan_args = kernel_plan_args(plan, t, s)
    delta = jnp.einsum("btnh,btnh->bnt", d_out.astype(jnp.float32), out.astype(jnp.float32)) - d_lse
    lse = jnp.where(jnp.isfinite(lse), lse, -jnp.inf)
    whole = lambda x: pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)
    kv_all = pl.BlockSpec((None, s, None, h), lambda ti, bi, ni: (bi, 0, ni // g, 0))
    params = pltriton.CompilerParams(num_warps=num_warps or (4 if h <= 64 else 8), num_stages=num_stages)
    common = dict(scale=scale, q_block=bq, kv_block=bk, num_heads=n)

    tile = pl.BlockSpec((None, bq, None, h), lambda ti, bi, ni: (bi, ti, ni, 0))
    rows = pl.BlockSpec((None, None, bq), lambda ti, bi, ni: (bi, ni, ti))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, num_tiles=tb, m_max=plan.kv_blocks.shape[-1], **common), grid=(tb, b, n),
        in_specs=[whole(a) for a in plan_args] + [tile, kv_all, kv_all, tile, rows, rows], out_specs=tile,
        out_shape=jax.ShapeDtypeStruct(q.shape, jnp.float32), compiler_params=params, interpret=interpret,
        name="rtpurbo_block_sparse_attention_dq")(*plan_args, q, k, v, d_out, lse, delta)

    tiles, tcounts = transpose_plan(plan, sb)
    t_args = (tiles.reshape(-1), tcounts.reshape(-1)) + plan_args[2:]
    q_all = pl.BlockSpec((None, t, None, h), lambda ji, bi, ni: (bi, 0, ni, 0))
    rows_all = pl.BlockSpec((None, None, t), lambda ji, bi, ni: (bi, ni, 0))
    kv_blk = pl.BlockSpec((None, bk, None, h), lambda ji, bi, ni: (bi, ji, ni // g, 0))
    out_blk = pl.BlockSpec((None, bk, None, h), lambda ji, bi, ni: (bi, ji, ni, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, num_kv_blocks=sb, num_tiles=tb, **common), grid=(sb, b, n),
        in_specs=[whole(a) for a in t_args] + [q_all, kv_blk, kv_blk, q_all, rows_all, rows_all],
        out_specs=[out_blk, out_blk],
        out_shape=[jax.ShapeDtypeStruct((b, s, n, h), jnp.float32)] * 2, compiler_params=params,
        interpret=interpret, name="rtpurbo_block_sparse_attention_dkdv")(*t_args, q, k, v, d_out, lse, delta)
    group_sum = lambda x: x.reshape(b, s, kh, g, h).sum(3).astype(k.dtype)
    return dq.astype(q.dtype), group_sum(dk), group_sum(dv)


def block_sparse_attention_triton_vjp(q, k, v, plan: BlockPlan, *, scale=None, interpret: bool = False):
    """`triton.block_sparse_attention_triton` (out, lse) with this module's backward as its VJP (in q, k, v; the
    plan is a selection, not differentiated). Same contract: T, S multiples of the plan's blocks."""
    return _attention(q, k, v, plan, float(q.shape[-1] ** -0.5 if scale is None else scale), interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, plan, scale, interpret):
    from pallas_kernels.sparse_attention.triton import block_sparse_attention_triton

    return block_sparse_attention_triton(q, k, v, plan, scale=scale, interpret=interpret)


def _attention_fwd(q, k, v, plan, scale, interpret):
    out, lse = _attention(q, k, v, plan, scale, interpret)
    return (out, lse), (q, k, v, plan, out, lse)


def _attention_bwd(scale, interpret, res, cts):
    q, k, v, plan, out, lse = res
    dq, dk, dv = block_sparse_attention_triton_bwd(q, k, v, plan, out, lse, *cts, scale=scale, interpret=interpret)
    return dq, dk, dv, zero_cotangent(plan)


_attention.defvjp(_attention_fwd, _attention_bwd)
