"""Block-sparse flash attention, Pallas with the Triton lowering (portable GPU backend).

Grid (Tb, B, N): one program per (query tile, batch, query head). The program loads its q tile once, walks
the plan's `counts[b, n, t]` key blocks (ids read from a GMEM ref — GPU lowerings have no scalar prefetch),
and keeps the flash-attention running max / sum / accumulator in registers (fp32). Masking (causal, padding,
sink, window) is applied elementwise in every visited block.

Layouts: q [B, T, N, H], k/v [B, S, K, H] used in place (strided, no transposes). T must be a multiple of the
plan's q_block and S of its kv_block (`api.py` pads); H a power of two.
Labelled portable: the notes measured Triton-lowered kernels at 0.5-0.75x cuDNN on the H100, and Pallas'
Triton lowering is deprecated since JAX 0.11; the Hopper fast path is Mosaic GPU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import online_softmax
from pallas_kernels.block_plan import BlockPlan, kernel_plan_args



def _kernel(blocks_ref, counts_ref, sinks_ref, window_ref, kvlen_ref, qstart_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *,
            scale: float, q_block: int, kv_block: int, num_heads: int, num_tiles: int, m_max: int):
    t, b, n = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    row = (b * num_heads + n) * num_tiles + t
    count = counts_ref[row]
    sink, window, kv_len = sinks_ref[n], window_ref[n], kvlen_ref[b]
    q = q_ref[...]  # [bq, H]
    q_pos = qstart_ref[b] + t * q_block + lax.broadcasted_iota(jnp.int32, (q_block, kv_block), 0)
    qk_scale = scale * math.log2(math.e)

    def body(j, carry):
        acc, m_prev, l_prev = carry
        kb = blocks_ref[row * m_max + j]
        start = pl.multiple_of(kb * kv_block, kv_block)
        k = k_ref[pl.ds(start, kv_block), :]
        s = pltriton.dot(q, k, trans_b=True) * qk_scale  # fp32 [bq, bk]
        k_pos = start + lax.broadcasted_iota(jnp.int32, (q_block, kv_block), 1)
        vis = (k_pos <= q_pos) & (k_pos < kv_len) & ((k_pos < sink) | (q_pos - k_pos < window))
        return online_softmax.step_exp2(s, vis, acc, m_prev, l_prev,
                                         lambda: v_ref[pl.ds(start, kv_block), :], pltriton.dot)

    h = q.shape[-1]
    init = (jnp.zeros((q_block, h), jnp.float32), jnp.full((q_block,), online_softmax.NEG, jnp.float32),
            jnp.zeros((q_block,), jnp.float32))
    acc, m, l = lax.fori_loop(0, count, body, init)
    safe = jnp.where(l > 0, l, 1.0)
    o_ref[...] = (acc / safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(l > 0, (m + jnp.log2(safe)) / math.log2(math.e), -jnp.inf)


@functools.partial(jax.jit, static_argnames=("scale", "num_warps", "num_stages", "interpret"))
def block_sparse_attention_triton(q, k, v, plan: BlockPlan, *, scale=None, num_warps: int | None = None,
                                  num_stages: int = 2, interpret: bool = False, o_init=None):
    """out [B, T, N, H] (q.dtype), lse fp32 [B, N, T]; same contract as the reference (aligned T, S).

    o_init: optional [B, T, N, H] buffer aliased to the output (tests pass NaNs to catch unwritten rows).
    """

    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    bq, bk = plan.q_block, plan.kv_block
    plan_args = kernel_plan_args(plan, t, s)
    tb, m_max = t // bq, plan.kv_blocks.shape[-1]
    g = n // kh
    scale = h ** -0.5 if scale is None else scale
    kernel = functools.partial(_kernel, scale=scale, q_block=bq, kv_block=bk, num_heads=n, num_tiles=tb, m_max=m_max)
    whole = lambda x: pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)
    in_specs = [whole(a) for a in plan_args] + [
        pl.BlockSpec((None, bq, None, h), lambda ti, bi, ni: (bi, ti, ni, 0)),
        pl.BlockSpec((None, s, None, h), lambda ti, bi, ni: (bi, 0, ni // g, 0)),
        pl.BlockSpec((None, s, None, h), lambda ti, bi, ni: (bi, 0, ni // g, 0)),
    ]
    out_specs = [pl.BlockSpec((None, bq, None, h), lambda ti, bi, ni: (bi, ti, ni, 0)),
                 pl.BlockSpec((None, None, bq), lambda ti, bi, ni: (bi, ni, ti))]
    extra, aliases = (), {}
    if o_init is not None:
        in_specs.append(pl.BlockSpec(memory_space=pl.ANY))
        extra, aliases = (o_init,), {len(in_specs) - 1: 0}
        kernel = _ignore_last_input(kernel)
    return pl.pallas_call(
        kernel, grid=(tb, b, n), in_specs=in_specs, out_specs=out_specs,
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, t), jnp.float32)],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps or (4 if h <= 64 else 8), num_stages=num_stages),
        interpret=interpret, input_output_aliases=aliases, name="rtpurbo_block_sparse_attention",
    )(*plan_args, q, k, v, *extra)


def _ignore_last_input(kernel):
    """Wrap a kernel whose last input is an aliased output buffer it never reads."""
    def wrapped(*refs):
        n_in = len(refs) - 2  # two outputs
        return kernel(*refs[:n_in - 1], *refs[n_in:])
    return wrapped
