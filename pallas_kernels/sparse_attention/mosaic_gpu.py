"""Block-sparse flash attention, Pallas Mosaic GPU (the Hopper fast path).

One CTA per (query head, 128-row query tile, batch) with three warpgroups: two compute warpgroups own 64 query
rows each and one memory warpgroup streams the plan's K/V blocks into a ring of `num_stages` SMEM slots with TMA.
The plan list of the tile (ids read from a GMEM ref: GPU lowerings have no scalar prefetch) drives both the
memory loop and the compute loop, so skipped blocks cost nothing. The compute warpgroups alternate on the tensor
cores through a schedule barrier (FA3's ping-pong): while one runs its QK^T / PV `wgmma`, the other does softmax.

Masking is per block and per warpgroup: a block whose 64 x kv_block tile is entirely visible (below the causal
diagonal, inside kv_len, and inside the sink or window band) takes the mask-free branch; the others (diagonal,
window edge, sink edge, padding) get the elementwise mask computed from iotas. Masked scores use a finite
-2e30 and the running max starts at -1e30, so rows that see nothing yet stay NaN-free.

Layouts: q [B, T, N, H], k/v [B, S, K, H] in place (TMA reads strided rows; no transposes). Requirements (checked):
plan.q_block == 128, plan.kv_block in {64, 128}, H in {64, 128}, bf16 or f16, T and S whole blocks (`api.py`
pads). Accumulation and softmax in fp32; output in q.dtype, LSE (natural log) in fp32 [B, N, T], -inf for empty rows.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.block_plan import BlockPlan, kernel_plan_args

_M0 = -1e30  # initial running max (log2 units)
_MASKED = -2e30  # masked score: exp2(_MASKED - m) == 0 for every reachable m
WG_ROWS = 64  # query rows per compute warpgroup
COMPUTE_WGS = 2


def _rem(x, n: int):
    """x mod n for a traced int32 scalar; the constant is made at the use site (closing over a concrete array
    inside `run_state` breaks the Mosaic GPU lowering)."""
    return lax.rem(x, jnp.array(n, x.dtype))


def check_supported(q, k, plan: BlockPlan) -> None:
    """Raise ValueError naming the first unsupported property of (q, k, plan) for this kernel."""
    h = q.shape[-1]
    if plan.q_block != WG_ROWS * COMPUTE_WGS:
        raise ValueError(f"mosaic_gpu backend needs plan.q_block == {WG_ROWS * COMPUTE_WGS}, got {plan.q_block}")
    if plan.kv_block not in (64, 128):
        raise ValueError(f"mosaic_gpu backend needs plan.kv_block in (64, 128), got {plan.kv_block}")
    if h not in (64, 128):
        raise ValueError(f"mosaic_gpu backend needs head_dim 64 or 128, got {h}")
    if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype:
        raise ValueError(f"mosaic_gpu backend needs bf16/f16 q, k, v of one dtype, got {q.dtype}, {k.dtype}")


def _kernel(blocks_ref, counts_ref, sinks_ref, window_ref, kvlen_ref, qstart_ref, q_ref, k_ref, v_ref, o_ref, lse_ref,
            scoped, *, scale: float, kv_block: int, num_heads: int, num_tiles: int, m_max: int,
            group: int, stages: int, fused_pv: bool):
    (q_smem2, k_smem, v_smem, lse_smem2, p_smem2), (k_ready, v_ready, q_ready), (k_free, v_free), sched = scoped
    ni, ti, bi = lax.axis_index("heads"), lax.axis_index("tiles"), lax.axis_index("batch")
    wg = lax.axis_index("wg")
    row = (bi * num_heads + ni) * num_tiles + ti
    count = counts_ref[row]
    base = row * m_max
    h = q_ref.shape[-1]
    dtype = q_ref.dtype
    qk_scale = scale * math.log2(math.e)

    def schedule_round():
        plgpu.barrier_arrive(sched)
        plgpu.barrier_wait(sched)

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        q_smem, lse_smem = q_smem2.at[wg], lse_smem2.at[wg]
        q_start = ti * (WG_ROWS * COMPUTE_WGS) + wg * WG_ROWS
        plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(q_start, WG_ROWS), ni], q_smem, q_ready.at[wg])
        sink, window, kv_len = sinks_ref[ni], window_ref[ni], kvlen_ref[bi]
        q_lo = qstart_ref[bi] + q_start
        q_hi = q_lo + (WG_ROWS - 1)
        plgpu.barrier_wait(q_ready.at[wg])

        m_i = plgpu.layout_cast(jnp.full((WG_ROWS,), _M0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        l_i = plgpu.layout_cast(jnp.full((WG_ROWS,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        acc = plgpu.layout_cast(jnp.full((WG_ROWS, h), 0.0, jnp.float32), plgpu.Layout.WGMMA)

        @pl.when(count > 0)
        def _():
            plgpu.barrier_wait(k_ready.at[0])

        pl.when(wg == 1)(schedule_round)

        def step(j, carry):
            acc, m_i, l_i = carry
            slot = _rem(j, stages)
            k_lo = blocks_ref[base + j] * kv_block

            def qk_fn(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
                schedule_round()
                return acc_ref[...]

            s = pl.run_scoped(qk_fn, plgpu.ACC((WG_ROWS, kv_block), jnp.float32))
            plgpu.barrier_arrive(k_free.at[slot])
            s = s * qk_scale
            k_hi = k_lo + (kv_block - 1)
            full = (k_hi <= q_lo) & (k_hi < kv_len) & ((k_hi < sink) | (q_hi - k_lo < window))

            def masked(x):
                qp = q_lo + plgpu.broadcasted_iota(jnp.int32, x.shape, 0, layout=plgpu.Layout.WGMMA)
                kp = k_lo + plgpu.broadcasted_iota(jnp.int32, x.shape, 1, layout=plgpu.Layout.WGMMA)
                vis = (kp <= qp) & (kp < kv_len) & ((kp < sink) | (qp - kp < window))
                return jnp.where(vis, x, _MASKED)

            s = lax.cond(full, lambda x: x, masked, s)
            m_new = jnp.maximum(m_i, s.max(axis=1))
            alpha = jnp.exp2(m_i - m_new)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            l_i = l_i * alpha + p.sum(axis=1)
            p16 = p.astype(dtype)
            acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
            plgpu.barrier_arrive(sched)
            plgpu.barrier_wait(v_ready.at[slot])
            plgpu.barrier_wait(sched)

            def wait_next_k():
                nxt = j + 1

                @pl.when(nxt < count)
                def _():
                    plgpu.barrier_wait(k_ready.at[_rem(nxt, stages)])

            if fused_pv:  # accumulate in place (run_state): the GPU path
                def pv_fn(acc_ref):
                    plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                    wait_next_k()

                acc = pl.run_state(pv_fn)(plgpu.ACC.init(acc))
            else:  # P staged in SMEM, fresh accumulator + add: the form GPU interpret mode runs (it has no
                # run_state and no register lhs for wgmma)
                p_smem = p_smem2.at[wg]
                p_smem[...] = p16
                plgpu.commit_smem()

                def pv_fn(acc_ref):
                    plgpu.wgmma(acc_ref, p_smem, v_smem.at[slot])
                    wait_next_k()
                    return acc_ref[...]

                acc = acc + pl.run_scoped(pv_fn, plgpu.ACC((WG_ROWS, h), jnp.float32))
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, m_new, l_i

        acc, m_i, l_i = lax.fori_loop(0, count, step, (acc, m_i, l_i))
        pl.when(wg == 0)(schedule_round)

        nonempty = l_i > 0.0
        inv = 1.0 / jnp.where(nonempty, l_i, 1.0)
        q_smem[...] = (acc * lax.broadcast_in_dim(inv, acc.shape, [0])).astype(dtype)
        lse_smem[...] = jnp.where(nonempty, (m_i + jnp.log2(jnp.where(nonempty, l_i, 1.0))) * math.log(2.0),
                                  -jnp.inf)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, o_ref.at[bi, pl.ds(q_start, WG_ROWS), ni])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[bi, ni, pl.ds(q_start, WG_ROWS)])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")
        kvh = lax.div(ni, jnp.int32(group))

        def issue(j, slot):
            start = pl.multiple_of(blocks_ref[base + j] * kv_block, kv_block)
            src = (bi, pl.ds(start, kv_block), kvh)
            plgpu.copy_gmem_to_smem(k_ref.at[src], k_smem.at[slot], k_ready.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[src], v_smem.at[slot], v_ready.at[slot])

        for i in range(stages):
            pl.when(i < count)(functools.partial(issue, i, i))

        @pl.loop(0, jnp.maximum(count - stages, 0))
        def _(j):
            slot = _rem(j, stages)
            nxt = j + stages
            start = pl.multiple_of(blocks_ref[base + nxt] * kv_block, kv_block)
            src = (bi, pl.ds(start, kv_block), kvh)
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.copy_gmem_to_smem(k_ref.at[src], k_smem.at[slot], k_ready.at[slot])
            plgpu.barrier_wait(v_free.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[src], v_smem.at[slot], v_ready.at[slot])

        @pl.loop(jnp.maximum(count - stages, 0), count)
        def _(j):  # drain: observe the last releases so every barrier phase is consumed
            slot = _rem(j, stages)
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.barrier_wait(v_free.at[slot])


@functools.partial(jax.jit, static_argnames=("num_stages", "interpret", "fused_pv", "detect_races"))
def block_sparse_attention_mosaic_gpu(q, k, v, plan: BlockPlan, *, scale=None, num_stages: int = 2,
                                      interpret: bool = False, fused_pv: bool | None = None,
                                      detect_races: bool = False):
    """out [B, T, N, H] (q.dtype), lse fp32 [B, N, T]; same contract as the reference (aligned T, S).

    fused_pv: accumulate PV in place (default on GPU); interpret mode needs False (no run_state there).
    """
    fused_pv = (not interpret) if fused_pv is None else fused_pv
    check_supported(q, k, plan)
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    bk = plan.kv_block
    plan_args = kernel_plan_args(plan, t, s)
    tb, m_max = t // plan.q_block, plan.kv_blocks.shape[-1]
    scale = h ** -0.5 if scale is None else scale
    stages = max(2, min(num_stages, m_max))
    body = functools.partial(_kernel, scale=scale, kv_block=bk, num_heads=n,
                             num_tiles=tb, m_max=m_max, group=n // kh, stages=stages, fused_pv=fused_pv)
    tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

    def entry(*refs):
        pl.run_scoped(
            lambda *scoped: body(*refs, scoped),
            (plgpu.SMEM((COMPUTE_WGS, WG_ROWS, h), q.dtype, transforms=tiled),
             plgpu.SMEM((stages, bk, h), k.dtype, transforms=tiled),
             plgpu.SMEM((stages, bk, h), v.dtype, transforms=tiled),
             plgpu.SMEM((COMPUTE_WGS, WG_ROWS), jnp.float32),
             None if fused_pv else plgpu.SMEM((COMPUTE_WGS, WG_ROWS, bk), q.dtype, transforms=tiled)),
            (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
             plgpu.Barrier(num_barriers=COMPUTE_WGS)),
            (plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),) * 2,
            plgpu.Barrier(num_arrivals=COMPUTE_WGS),
            collective_axes="wg",
        )

    kwargs = {}
    if interpret:
        # Fresh buffers start as NaN, so rows the kernel forgets to write fail the tests; races are detected.
        kwargs["interpret"] = plgpu.InterpretGPUParams(uninitialized_memory="nan", detect_races=detect_races)
    return plgpu.kernel(
        entry,
        out_type=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, t), jnp.float32)],
        grid=(n, tb, b), grid_names=("heads", "tiles", "batch"),
        num_threads=COMPUTE_WGS + 1, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **kwargs,
    )(*plan_args, q, k, v)
