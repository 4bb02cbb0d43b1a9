"""Block-sparse flash attention, Pallas Mosaic TPU backend (scalar-prefetched plan, as splash attention does).

Grid (B, N, Tb, M): the innermost axis walks the plan's M entries. The plan (flattened int32) is
scalar-prefetched into SMEM; the K/V index_map reads the block id for entry j, so only planned blocks are
DMA'd (entries past `counts` repeat the last id, which Pallas does not re-fetch, and are skipped by
`pl.when`). Online-softmax state lives in VMEM scratch across the M axis.

Layouts: q is taken head-major [B, N, T, H] and k/v [B, K, S, H] so each block's last two dims are
(rows, H), as TPU tiling wants; `api.py` transposes. T and S must be multiples of q_block / kv_block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import online_softmax
from pallas_kernels.block_plan import BlockPlan, kernel_plan_args



def _kernel(blocks_ref, counts_ref, sinks_ref, window_ref, kvlen_ref, qstart_ref, q_ref, k_ref, v_ref, o_ref, lse_ref,
            m_sc, l_sc, acc_sc, *, scale, q_block, kv_block, num_heads, num_tiles, m_max):
    b, n, t, j = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    row = (b * num_heads + n) * num_tiles + t

    def visible(k_pos):
        q_pos = qstart_ref[b] + t * q_block + lax.broadcasted_iota(jnp.int32, k_pos.shape, 0)
        return (k_pos <= q_pos) & (k_pos < kvlen_ref[b]) & ((k_pos < sinks_ref[n]) | (q_pos - k_pos < window_ref[n]))

    online_softmax.scratch_row_step(j, counts_ref[row], m_max - 1, lambda: blocks_ref[row * m_max + j] * kv_block,
                                    q_ref, k_ref, v_ref, scale, visible, m_sc, l_sc, acc_sc, o_ref, lse_ref)


@functools.partial(jax.jit, static_argnames=("interpret",))
def block_sparse_attention_tpu(q_hm, k_hm, v_hm, plan: BlockPlan, *, scale=None, interpret=False, o_init=None):
    """Head-major q [B, N, T, H], k/v [B, K, S, H] -> out [B, N, T, H] (q.dtype), lse fp32 [B, N, T, 1].

    o_init: optional [B, N, T, H] buffer aliased to the output (tests pass NaNs to catch unwritten rows).
    """
    b, n, t, h = q_hm.shape
    kh, s = k_hm.shape[1], k_hm.shape[2]
    bq, bk = plan.q_block, plan.kv_block
    prefetch = kernel_plan_args(plan, t, s)
    tb, m_max, g = t // bq, plan.kv_blocks.shape[-1], n // kh
    scale = h ** -0.5 if scale is None else scale

    def kv_map(bi, ni, ti, ji, blocks, *_):
        return bi, lax.div(ni, g), blocks[((bi * n + ni) * tb + ti) * m_max + ji], 0  # lax.div: no sign op on TPU

    q_map = lambda bi, ni, ti, ji, *_: (bi, ni, ti, 0)
    in_specs = [pl.BlockSpec((None, None, bq, h), q_map), pl.BlockSpec((None, None, bk, h), kv_map),
                pl.BlockSpec((None, None, bk, h), kv_map)]
    extra, aliases = (), {}
    if o_init is not None:  # aliased output buffer, never read
        in_specs.append(pl.BlockSpec(memory_space=pl.ANY))
        extra, aliases = (o_init,), {len(prefetch) + 3: 0}
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(prefetch), grid=(b, n, tb, m_max),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, None, bq, h), q_map), pl.BlockSpec((None, None, bq, 1), q_map)],
        scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                        pltpu.VMEM((bq, h), jnp.float32)])
    kernel = functools.partial(_kernel, scale=scale, q_block=bq, kv_block=bk, num_heads=n, num_tiles=tb, m_max=m_max)
    if o_init is not None:
        inner = kernel
        kernel = lambda *refs: inner(*refs[:9], *refs[10:])  # drop the aliased buffer's input ref
    return pl.pallas_call(
        kernel, grid_spec=grid_spec, input_output_aliases=aliases,
        out_shape=[jax.ShapeDtypeStruct(q_hm.shape, q_hm.dtype), jax.ShapeDtypeStruct((b, n, t, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False, name="rtpurbo_block_sparse_attention_tpu",
    )(*prefetch, q_hm, k_hm, v_hm, *extra)
