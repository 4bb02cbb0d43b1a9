"""Sparse decode attention, Pallas Mosaic TPU backend: the union list streamed per program, split-K, key tiles.

Grid (B, K, splits): one program per (sequence, GQA group, split). A program takes its share of the group's
union entries (`counts` split evenly at run time, as the Triton backend does, so short plans do not idle most
splits), copies that share of the plan (block ids and one head-mask word per entry, bit h for query head h)
from HBM into SMEM — the whole plan never sits in scalar memory — and walks it `gather` blocks at a time: the
blocks' K/V rows are DMA'd from HBM into one [gather · kv_block, H] VMEM tile (double-buffered: the next tile's
copies run under the current tile's matmuls), so each matmul sees 256 keys instead of 64. All G query heads of
the group (rows padded to a multiple of 8) share each tile; masks (head bits, causal, sinks + window, entries
past the share) are computed from iotas. Each split writes a normalised partial output and its log-sum-exp;
`triton.combine` merges them (one small XLA fusion).

Layouts: q [B, K, Gp, H]; k / v head-major [B, K, S, H] (the api transposes); S a multiple of kv_block.
Limits: G <= 32 (one mask word per entry).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import online_softmax
from pallas_kernels.sparse_decode.plan import DecodePlan, head_mask_words, kernel_dims
from pallas_kernels.sparse_decode.triton import combine
from pallas_kernels.tpu_dma import copy_in, entry_columns, walk_gathered


def _kernel(counts_ref, sinks_ref, window_ref, shift_ref, kvlen_ref, blocks_hbm, words_hbm, q_ref, k_hbm, v_hbm,
            o_ref, lse_ref, blocks_sm, words_sm, k_buf, v_buf, sem, plan_sem, m_sc, l_sc, acc_sc, *, scale,
            kv_block, g, num_kv, splits, share, gather):
    b, kh, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    row = b * num_kv + kh
    count = counts_ref[row]
    per = lax.div(count + (splits - 1), jnp.int32(splits))
    lo = sp * per
    n_e = jnp.maximum(jnp.minimum(lo + per, count) - lo, 0)
    copy_in(pltpu.make_async_copy(blocks_hbm.at[row, pl.ds(lo, share)], blocks_sm, plan_sem.at[0]),
            pltpu.make_async_copy(words_hbm.at[row, pl.ds(lo, share)], words_sm, plan_sem.at[1]))
    online_softmax.init_scratch(m_sc, l_sc, acc_sc)
    first_key = lambda e: blocks_sm[e] * kv_block

    gp, h = q_ref.shape
    width = gather * kv_block
    r_iota = lax.broadcasted_iota(jnp.int32, (gp, width), 0)
    q_pos = jnp.zeros((gp, width), jnp.int32)
    sink = jnp.zeros((gp, width), jnp.int32)
    window = jnp.zeros((gp, width), jnp.int32)
    for r in range(g):  # per-head scalars from SMEM, spread over the head's row
        hd = kh * g + r
        q_pos = jnp.where(r_iota == r, kvlen_ref[b] - 1 - shift_ref[hd], q_pos)
        sink = jnp.where(r_iota == r, sinks_ref[hd], sink)
        window = jnp.where(r_iota == r, window_ref[hd], window)
    q = q_ref[...]

    def visit(slot, entries):
        k, v = k_buf[slot], v_buf[slot]
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
        k_pos, word = entry_columns((gp, width), kv_block, entries, first_key, lambda e: words_sm[e])
        use = lax.bitwise_and(lax.shift_right_logical(word, r_iota), 1) != 0
        vis = use & (k_pos <= q_pos) & ((k_pos < sink) | (q_pos - k_pos < window))
        online_softmax.step_scratch(s, vis, v, m_sc, l_sc, acc_sc)

    walk_gathered(n_e, gather, kv_block, first_key, k_hbm.at[b, kh], v_hbm.at[b, kh], k_buf, v_buf, sem, visit)
    online_softmax.finish_scratch(m_sc, l_sc, acc_sc, o_ref, lse_ref)


def default_splits(batch: int, num_kv_heads: int) -> int:
    """2 when batch x groups cannot keep two TensorCores busy (megacore chips), else 1."""
    return 2 if batch * num_kv_heads < 2 else 1


@functools.partial(jax.jit, static_argnames=("splits", "gather", "interpret"))
def sparse_decode_tpu(q, k_hm, v_hm, plan: DecodePlan, *, scale=None, splits: int | None = None, gather: int = 4,
                      interpret: bool = False):
    """q [B, N, H], head-major k / v [B, K, S, H] -> (out [B, N, H] q.dtype, lse fp32 [B, N]).

    splits: programs per group sharing its union list (None: `default_splits`); gather: plan blocks per K/V tile.
    """
    kh = k_hm.shape[1]
    b, n, h, g, bk, m_max = kernel_dims(q, k_hm.shape[2], kh, plan)
    gp = -(-g // 8) * 8
    splits = splits or default_splits(b, kh)
    share = -(-m_max // splits)
    scale = h ** -0.5 if scale is None else scale
    qp = jnp.pad(q.reshape(b, kh, g, h), ((0, 0), (0, 0), (0, gp - g), (0, 0)))
    words = head_mask_words(plan).reshape(b * kh, m_max)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, share)))  # a share's window may run past M
    blocks = pad(plan.kv_blocks.reshape(b * kh, m_max).astype(jnp.int32))
    prefetch = (plan.counts.reshape(-1).astype(jnp.int32), plan.sinks, plan.window, plan.shifts(),
                plan.kv_len.astype(jnp.int32))
    q_map = lambda bi, ki, si, *_: (bi, ki, 0, 0)
    o_map = lambda bi, ki, si, *_: (bi, ki, si, 0, 0)
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    width = gather * bk
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(prefetch), grid=(b, kh, splits),
        in_specs=[hbm, hbm, pl.BlockSpec((None, None, gp, h), q_map), hbm, hbm],
        out_specs=[pl.BlockSpec((None, None, None, gp, h), o_map), pl.BlockSpec((None, None, None, gp, 1), o_map)],
        scratch_shapes=[pltpu.SMEM((share,), jnp.int32), pltpu.SMEM((share,), jnp.int32),
                        pltpu.VMEM((2, width, h), k_hm.dtype), pltpu.VMEM((2, width, h), v_hm.dtype),
                        pltpu.SemaphoreType.DMA((2, 2)), pltpu.SemaphoreType.DMA((2,)),
                        pltpu.VMEM((gp, 1), jnp.float32), pltpu.VMEM((gp, 1), jnp.float32),
                        pltpu.VMEM((gp, h), jnp.float32)])
    kernel = functools.partial(_kernel, scale=scale, kv_block=bk, g=g, num_kv=kh, splits=splits, share=share,
                               gather=gather)
    o_parts, lse_parts = pl.pallas_call(
        kernel, grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((b, kh, splits, gp, h), jnp.float32),
                   jax.ShapeDtypeStruct((b, kh, splits, gp, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
        interpret=pltpu.InterpretParams() if interpret else False, name="rtpurbo_sparse_decode_tpu",
    )(*prefetch, blocks, pad(words), qp, k_hm, v_hm)
    out, lse = combine(o_parts, lse_parts[..., 0])  # [B, K, Gp, H], [B, K, Gp]
    return out[:, :, :g].reshape(b, n, h).astype(q.dtype), lse[:, :, :g].reshape(b, n)
