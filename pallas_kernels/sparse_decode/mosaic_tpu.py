"""Sparse decode attention, Pallas Mosaic TPU backend (scalar-prefetched union lists).

Grid (B, K, M): the innermost axis walks the group's union entries; the K/V index_map reads entry j's block id
from SMEM, so only planned blocks are DMA'd (entries past `counts` repeat the last id and are skipped). All G
query heads of the group (rows padded to a multiple of 8) share each block; `head_mask` (SMEM scalars) masks per
head. Online-softmax state lives in VMEM scratch across M.

Layouts: q [B, K, Gp, H]; k / v head-major [B, K, S, H] (the api transposes); S a multiple of kv_block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import online_softmax
from pallas_kernels.sparse_decode.plan import DecodePlan, kernel_dims



def _kernel(blocks_ref, counts_ref, hmask_ref, sinks_ref, window_ref, shift_ref, kvlen_ref, q_ref, k_ref, v_ref,
            o_ref, lse_ref, m_sc, l_sc, acc_sc, *, scale, kv_block, m_max, g, gp, num_kv):
    b, kh, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    row = b * num_kv + kh

    def visible(k_pos):
        gi = lax.broadcasted_iota(jnp.int32, k_pos.shape, 0)
        vis = jnp.zeros(k_pos.shape, jnp.bool_)
        for r in range(g):  # per-head scalars from SMEM, spread over the head's row
            hd = kh * g + r
            q_pos = kvlen_ref[b] - 1 - shift_ref[hd]
            ok = (hmask_ref[(row * m_max + j) * g + r] != 0) & (k_pos <= q_pos) & \
                ((k_pos < sinks_ref[hd]) | (q_pos - k_pos < window_ref[hd]))
            vis = vis | ((gi == r) & ok)
        return vis

    online_softmax.scratch_row_step(j, counts_ref[row], m_max - 1, lambda: blocks_ref[row * m_max + j] * kv_block,
                                    q_ref, k_ref, v_ref, scale, visible, m_sc, l_sc, acc_sc, o_ref, lse_ref)


@functools.partial(jax.jit, static_argnames=("interpret",))
def sparse_decode_tpu(q, k_hm, v_hm, plan: DecodePlan, *, scale=None, interpret: bool = False):
    """q [B, N, H], head-major k / v [B, K, S, H] -> (out [B, N, H] q.dtype, lse fp32 [B, N])."""
    kh = k_hm.shape[1]
    b, n, h, g, bk, m_max = kernel_dims(q, k_hm.shape[2], kh, plan)
    gp = -(-g // 8) * 8
    scale = h ** -0.5 if scale is None else scale
    qp = jnp.pad(q.reshape(b, kh, g, h), ((0, 0), (0, 0), (0, gp - g), (0, 0)))
    prefetch = (plan.kv_blocks.reshape(-1), plan.counts.reshape(-1), plan.head_mask.astype(jnp.int32).reshape(-1),
                plan.sinks, plan.window, plan.shifts(), plan.kv_len.astype(jnp.int32))

    def kv_map(bi, ki, ji, blocks, *_):
        return bi, ki, blocks[(bi * kh + ki) * m_max + ji], 0

    q_map = lambda bi, ki, ji, *_: (bi, ki, 0, 0)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(prefetch), grid=(b, kh, m_max),
        in_specs=[pl.BlockSpec((None, None, gp, h), q_map), pl.BlockSpec((None, None, bk, h), kv_map),
                  pl.BlockSpec((None, None, bk, h), kv_map)],
        out_specs=[pl.BlockSpec((None, None, gp, h), q_map), pl.BlockSpec((None, None, gp, 1), q_map)],
        scratch_shapes=[pltpu.VMEM((gp, 1), jnp.float32), pltpu.VMEM((gp, 1), jnp.float32),
                        pltpu.VMEM((gp, h), jnp.float32)])
    kernel = functools.partial(_kernel, scale=scale, kv_block=bk, m_max=m_max, g=g, gp=gp, num_kv=kh)
    out, lse = pl.pallas_call(
        kernel, grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((b, kh, gp, h), q.dtype), jax.ShapeDtypeStruct((b, kh, gp, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False, name="rtpurbo_sparse_decode_tpu",
    )(*prefetch, qp, k_hm, v_hm)
    return out[:, :, :g].reshape(b, n, h), lse[:, :, :g, 0].reshape(b, n)
