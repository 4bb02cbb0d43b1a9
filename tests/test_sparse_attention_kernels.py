"""One suite for every Pallas backend of block-sparse attention, in interpret mode on CPU, against the
reference. Outputs are NaN-poisoned (aliased buffers) so unwritten rows fail. bf16 tolerances are derived:
kernel error <= 2 x the bf16 reference's own error (vs the fp32 reference) + a small floor."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import check_op_against_reference
from pallas_kernels.block_plan import band_plan, cdiv, plan_from_selection
from pallas_kernels.sparse_attention.api import block_sparse_attention

BACKENDS = ["triton", "mosaic_tpu", "xla"]
#        b,  t,   s,  n, kh,   h, qb, kb, q_off, plan
CASES = [(1, 64, 64, 4, 4, 64, 16, 16, 0, "full"),
         (2, 33, 33, 8, 1, 128, 16, 16, 0, "random"),
         (1, 63, 65, 4, 1, 64, 16, 32, 2, "random"),
         (2, 17, 129, 4, 1, 64, 16, 64, 112, "one"),
         (1, 48, 48, 4, 2, 64, 16, 16, 0, "empty"),
         (1, 97, 97, 6, 3, 64, 32, 16, 0, "band")]


def make_plan(rng, kind, b, n, t, s, qb, kb, off):
    tb, sb = cdiv(t, qb), cdiv(s, kb)
    if kind == "band":
        return band_plan(b, n, t, s, sinks=4, window=20, q_block=qb, kv_block=kb, q_offset=off)
    sel = {"full": np.ones((b, n, tb, sb), bool), "empty": np.zeros((b, n, tb, sb), bool),
           "random": rng.random((b, n, tb, sb)) < 0.4}.get(kind)
    if kind == "one":
        sel = np.zeros((b, n, tb, sb), bool)
        sel[..., rng.integers(0, sb)] = True
    return plan_from_selection(jnp.asarray(sel), sinks=rng.integers(0, 3, n), window=rng.integers(8, s + 8, n),
                               kv_len=rng.integers(max(1, s - 20), s + 1, b), q_block=qb, kv_block=kb, q_offset=off)


def run_case(backend, case, dtype):
    b, t, s, n, kh, h, qb, kb, off, kind = case
    rng = np.random.default_rng(hash(case) % 2**32)
    q, k, v = (rng.normal(size=shape).astype(np.float32) for shape in ((b, t, n, h), (b, s, kh, h), (b, s, kh, h)))
    plan = make_plan(rng, kind, b, n, t, s, qb, kb, off)
    op = lambda *qkv, **kw: block_sparse_attention(*qkv, plan, return_lse=True, **kw)
    poison = jnp.full(q.shape, jnp.nan, dtype)  # aliased to the output: rows the kernel never writes stay NaN
    out = check_op_against_reference(op, (q, k, v), dtype, empty=kind == "empty", backend=backend, interpret=True,
                                     o_init=poison)
    assert not np.isnan(np.asarray(out, np.float32)).any(), "kernel left output rows unwritten"


def _case_id(c):
    return f"{c[-1]}-t{c[1]}-s{c[2]}-g{c[3] // c[4]}-h{c[5]}"


# Mosaic TPU in interpret mode costs 8-14 s a case on CI's CPU: its bf16 runs cover the plan kinds the fp32 test
# below does not (the two random plans, odd lengths and GQA 8 / block edges, run there in fp32)
BF16 = [(b, c) for b in BACKENDS for c in CASES if not (b == "mosaic_tpu" and c in CASES[1:3])]


@pytest.mark.parametrize("backend,case", BF16, ids=[f"{_case_id(c)}-{b}" for b, c in BF16])
def test_bf16_matches_reference(backend, case):
    run_case(backend, case, jnp.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES[1:3], ids=["odd-gqa8", "edges"])
def test_fp32_matches_reference(backend, case):
    run_case(backend, case, jnp.float32)


def test_tpu_kernel_lowers_for_tpu():
    """The Mosaic TPU backend lowers to a TPU module from CPU (jax.export), bf16, 128-row tiles."""
    from pallas_kernels.sparse_attention.mosaic_tpu import block_sparse_attention_tpu

    q = jax.ShapeDtypeStruct((1, 8, 512, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 2, 512, 128), jnp.bfloat16)
    plan = band_plan(1, 8, 512, 512, sinks=4, window=256, q_block=128, kv_block=128)
    exp = jax.export.export(jax.jit(block_sparse_attention_tpu), platforms=["tpu"])(q, kv, kv, plan)
    assert "tpu_custom_call" in exp.mlir_module()


@pytest.mark.parametrize("tile_blocks,tile_keys,kind,pack", [(1, 64, "random", True), (2, 32, "random", True),
                                                             (4, 64, "band", True), (3, 96, "random", False)])
def test_tpu_gathered_entries_and_runs_of_blocks(tile_blocks, tile_keys, kind, pack):
    """mosaic_tpu walking plan entries of tile_blocks consecutive blocks (1: the union of blocks itself; 3: a
    run that is not a power of two), tile_keys / (tile_blocks x kv_block) entries gathered per K/V tile, heads
    of one group visiting different blocks of an entry (the head bits), several tiles per query tile, S not a
    multiple of an entry (padded keys), ragged kv_len, a query offset, ids streamed as 16-bit pairs or int32;
    fp32 against the reference, out and lse."""
    from pallas_kernels.sparse_attention import reference
    from pallas_kernels.sparse_attention.mosaic_tpu import block_sparse_attention_tpu, tile_plan

    b, t, s, n, kh, h, qb, kb, off = 2, 48, 208, 8, 2, 64, 16, 16, 160  # the last rows see every key
    rng = np.random.default_rng(tile_blocks * 100 + tile_keys)
    q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in ((b, t, n, h), (b, s, kh, h), (b, s, kh, h)))
    plan = make_plan(rng, kind, b, n, t, s, qb, kb, off)
    gather = max(1, tile_keys // (tile_blocks * kb))
    assert int(tile_plan(plan, kh, s // kb, tile_blocks).counts.max()) > 2 * gather  # several K/V tiles
    hm = lambda x: jnp.swapaxes(x, 1, 2)
    out, lse = block_sparse_attention_tpu(hm(q), hm(k), hm(v), plan, interpret=True, tile_keys=tile_keys,
                                          tile_blocks=tile_blocks, pack_tiles=pack)
    want, want_lse = reference.block_sparse_attention(q, k, v, plan, return_lse=True)
    np.testing.assert_allclose(np.asarray(hm(out)), np.asarray(want), atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(lse[..., 0]), np.asarray(want_lse), atol=2e-5, rtol=2e-5)


def test_named_backend_that_cannot_run_raises():
    plan = band_plan(1, 2, 16, 16, sinks=0, window=16, q_block=16, kv_block=16)
    x = jnp.ones((1, 16, 2, 64))
    with pytest.raises(RuntimeError, match="needs a GPU"):
        block_sparse_attention(x, x, x, plan, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        block_sparse_attention(x, x, x, plan, backend="cuda")


# Mosaic GPU (Hopper) backend: 128-row query tiles; run in GPU interpret mode (simulated warpgroups, TMA and
# barriers; fresh buffers start as NaN; the race detector is on).
#              b,   t,   s,  n, kh,   h,  qb,  kb, q_off, plan
MOSAIC_CASES = [(1, 128, 128, 2, 2, 64, 128, 64, 0, "full"),
                (1, 200, 263, 8, 1, 128, 128, 64, 63, "random"),
                (2, 129, 191, 4, 1, 64, 128, 64, 0, "band"),
                (1, 256, 256, 4, 1, 64, 128, 128, 0, "random"),
                (1, 128, 130, 2, 1, 64, 128, 64, 2, "one"),
                (1, 128, 128, 2, 1, 64, 128, 64, 0, "empty")]


@pytest.mark.parametrize("case", MOSAIC_CASES, ids=[f"{c[-1]}-t{c[1]}-s{c[2]}-g{c[3] // c[4]}-h{c[5]}-kb{c[7]}"
                                                    for c in MOSAIC_CASES])
def test_mosaic_gpu_bf16_matches_reference(case):
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as gpu_interpret

    run_case("mosaic_gpu", case, jnp.bfloat16)
    assert not gpu_interpret.get_races().races_found, "GPU interpret mode detected a data race"


def test_mosaic_gpu_rejects_unsupported_plans():
    from pallas_kernels.sparse_attention.mosaic_gpu import check_supported

    x = jnp.ones((1, 128, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="q_block == 128"):
        check_supported(x, x, band_plan(1, 2, 128, 128, sinks=0, window=128, q_block=64, kv_block=64))
    with pytest.raises(ValueError, match="bf16/f16"):
        check_supported(x.astype(jnp.float32), x, band_plan(1, 2, 128, 128, sinks=0, window=128, q_block=128,
                                                            kv_block=64))


def test_mosaic_gpu_fused_kernel_lowers_for_cuda():
    """The GPU path (P in registers, PV accumulated in place), which interpret mode cannot run, lowers for CUDA."""
    from pallas_kernels.sparse_attention.mosaic_gpu import block_sparse_attention_mosaic_gpu

    q = jax.ShapeDtypeStruct((1, 256, 4, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 256, 1, 128), jnp.bfloat16)
    plan = band_plan(1, 4, 256, 256, sinks=4, window=128, q_block=128, kv_block=64)
    fn = jax.jit(lambda q, k, v, p: block_sparse_attention_mosaic_gpu(q, k, v, p, fused_pv=True))
    exp = jax.export.export(fn, platforms=["cuda"])(q, kv, kv, plan)
    assert "mosaic_gpu" in exp.mlir_module()


@pytest.mark.parametrize("backend", ["triton", "mosaic_tpu", "mosaic_gpu", "xla"])
def test_traced_query_starts_match_reference(backend):
    """Per-sequence query starts (serving's prefill chunks: row 0 of sequence b sits at q_start[b]) given as a
    traced array, under jit, on every backend."""
    qb = 128 if backend == "mosaic_gpu" else 32
    b, t, s, n, kh, h, kb = 2, 150, 400, 4, 2, 64, 64
    rng = np.random.default_rng(5)
    q, k, v = (rng.normal(size=shape).astype(np.float32) for shape in ((b, t, n, h), (b, s, kh, h), (b, s, kh, h)))
    starts = np.array([37, 250])
    sel = rng.random((b, n, cdiv(t, qb), cdiv(s, kb))) < 0.6
    plan = plan_from_selection(jnp.asarray(sel), sinks=np.array([0, 4, 0, 4]), window=np.array([500, 90, 500, 90]),
                               kv_len=starts + t - np.array([0, 10]), q_block=qb, kv_block=kb, q_start=starts)
    ref32 = block_sparse_attention(*map(jnp.asarray, (q, k, v)), plan, backend="reference")
    args = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
    ref_lp = block_sparse_attention(*args, plan, backend="reference")
    run = jax.jit(lambda q, k, v, p: block_sparse_attention(q, k, v, p, backend=backend, interpret=True))
    out = run(*args, plan)
    tol = 2 * float(jnp.abs(ref_lp.astype(jnp.float32) - ref32).max()) + 1e-3
    assert float(jnp.abs(out.astype(jnp.float32) - ref32).max()) <= tol
    # the dense mask really depends on the starts: shifting them changes the reference
    shifted = dataclasses.replace(plan, q_start=jnp.asarray(starts + 64))
    assert float(jnp.abs(block_sparse_attention(*map(jnp.asarray, (q, k, v)), shifted, backend="reference")
                         - ref32).max()) > 1e-2


# The differentiable backends ("xla", and "triton" with its Pallas backward kernels in interpret mode): gradients
# of out and lse against autodiff of the reference, every plan kind (xla: query tiles walked in several groups and
# plan entries several per step, the loop's edges), traced starts.
GRAD_BACKENDS = ["xla", "triton"]
def _loss(op, w_out, w_lse):
    def loss(q, k, v):
        out, lse = op(q, k, v)
        return (out.astype(jnp.float32) * w_out).sum() + (jnp.where(jnp.isfinite(lse), lse, 0.0) * w_lse).sum()
    return loss


def _grads(case, dtype, backend="xla", rows_per_group=32, blocks_per_step=3):
    """(`backend`'s grads in `dtype`, reference grads in fp32, reference grads in `dtype`) of a random projection
    of out and lse."""
    from pallas_kernels.sparse_attention import reference
    from pallas_kernels.sparse_attention.xla import block_sparse_attention_xla

    b, t, s, n, kh, h, qb, kb, off, kind = case
    rng = np.random.default_rng(hash(case) % 2**32 + 1)
    q, k, v = (rng.normal(size=shape).astype(np.float32) for shape in ((b, t, n, h), (b, s, kh, h), (b, s, kh, h)))
    plan = make_plan(rng, kind, b, n, t, s, qb, kb, off)
    w_out, w_lse = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32), jnp.asarray(rng.normal(size=(b, n, t)), jnp.float32)
    xla_op = lambda q, k, v: block_sparse_attention_xla(q, k, v, plan, rows_per_group=rows_per_group,
                                                        blocks_per_step=blocks_per_step)
    if backend == "triton":
        xla_op = lambda q, k, v: block_sparse_attention(q, k, v, plan, backend="triton", interpret=True,
                                                        return_lse=True)
    ref_op = lambda q, k, v: reference.block_sparse_attention(q, k, v, plan, return_lse=True)
    grad = lambda op, xs: jax.jit(jax.grad(_loss(op, w_out, w_lse), argnums=(0, 1, 2)))(*xs)
    lp = [jnp.asarray(x, dtype) for x in (q, k, v)]
    return grad(xla_op, lp), grad(ref_op, [jnp.asarray(x) for x in (q, k, v)]), grad(ref_op, lp)


@pytest.mark.parametrize("backend", GRAD_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[f"{c[-1]}-t{c[1]}-s{c[2]}-g{c[3] // c[4]}" for c in CASES])
def test_gradients_match_reference_fp32(backend, case):
    got, ref, _ = _grads(case, jnp.float32, backend)
    for name, a, r in zip("qkv", got, ref):
        scale = float(jnp.abs(r).max()) + 1e-6
        err = float(jnp.abs(a - r).max())
        assert err <= 1e-5 * scale + 1e-6, f"d{name}: max error {err:.3e} (scale {scale:.3e})"
    if case[-1] == "empty":
        assert all(float(jnp.abs(g).max()) == 0.0 for g in got)


@pytest.mark.parametrize("backend", GRAD_BACKENDS)
@pytest.mark.parametrize("case", CASES[1:3] + CASES[5:], ids=["odd-gqa8", "edges", "band"])
def test_gradients_bf16_within_derived_tolerance(backend, case):
    """bf16 inputs: the gradients' error against the fp32 reference is at most twice the bf16 reference's
    own error (autodiff of the definition on bf16 inputs) plus 0.2% of the gradient's scale (the backends also
    round probabilities and dS to bf16 for their matmuls, as flash kernels do)."""
    got, ref, ref_lp = _grads(case, jnp.bfloat16, backend, rows_per_group=64, blocks_per_step=2)
    for name, a, r, r_lp in zip("qkv", got, ref, ref_lp):
        scale = float(jnp.abs(r).max())
        tol = 2 * float(jnp.abs(r_lp.astype(jnp.float32) - r).max()) + 2e-3 * scale
        err = float(jnp.abs(a.astype(jnp.float32) - r).max())
        assert err <= tol, f"d{name}: max error {err:.3e} > derived tolerance {tol:.3e}"


@pytest.mark.parametrize("backend", GRAD_BACKENDS)
def test_gradients_with_traced_query_starts(backend):
    """Serving-style plans (row 0 of sequence b at q_start[b], traced) differentiate too, under jit."""
    from pallas_kernels.sparse_attention import reference
    from pallas_kernels.sparse_attention.xla import block_sparse_attention_xla

    b, t, s, n, kh, h, qb, kb = 2, 45, 130, 4, 2, 32, 16, 32
    rng = np.random.default_rng(11)
    q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in ((b, t, n, h), (b, s, kh, h), (b, s, kh, h)))
    starts = jnp.asarray([17, 80])
    sel = rng.random((b, n, cdiv(t, qb), cdiv(s, kb))) < 0.6
    w = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)

    def grads(op):
        def loss(q, k, v, starts):
            plan = plan_from_selection(jnp.asarray(sel), sinks=np.array([0, 4, 0, 4]), window=np.array([200, 30, 200, 30]),
                                       kv_len=starts + t - jnp.asarray([0, 5]), q_block=qb, kv_block=kb, q_start=starts)
            return (op(q, k, v, plan) * w).sum()
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v, starts)

    if backend == "xla":
        got = grads(lambda q, k, v, p: block_sparse_attention_xla(q, k, v, p, rows_per_group=16)[0])
    else:
        got = grads(lambda q, k, v, p: block_sparse_attention(q, k, v, p, backend="triton", interpret=True))
    ref = grads(lambda q, k, v, p: reference.block_sparse_attention(q, k, v, p))
    for a, r in zip(got, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=1e-5 * float(jnp.abs(r).max()) + 1e-6)
