"""Sparse decode attention: the DecodePlan's semantics against an independent numpy definition, and every
Pallas backend (interpret mode on CPU) against the reference. bf16 tolerance: 2 x the bf16 reference's own
error against fp32 + a small floor."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_plan import cdiv
from pallas_kernels.sparse_decode.api import sparse_decode_attention
from pallas_kernels.sparse_decode.plan import decode_plan, token_mask

BACKENDS = ["triton", "mosaic_tpu"]
#        b, n, kh,   h,   s, kb, plan,     splits
CASES = [(1, 4, 4, 64, 64, 16, "full", 1),
         (2, 8, 1, 128, 129, 16, "random", 3),   # GQA 8, block edge +1
         (3, 8, 2, 64, 127, 32, "random", 2),    # GQA 4, block edge -1, ragged lengths
         (2, 4, 1, 64, 200, 64, "one", 4),
         (1, 8, 2, 64, 96, 16, "empty", 2),
         (2, 16, 2, 64, 300, 16, "sparse", None)]


def make(case, rng):
    b, n, kh, h, s, kb, kind, _ = case
    sb = cdiv(s, kb)
    sel = {"full": np.ones((b, n, sb), bool), "empty": np.zeros((b, n, sb), bool),
           "random": rng.random((b, n, sb)) < 0.4, "sparse": rng.random((b, n, sb)) < 0.08}.get(kind)
    if kind == "one":
        sel = np.zeros((b, n, sb), bool)
        sel[np.arange(b)[:, None], np.arange(n)[None], rng.integers(0, sb, (b, n))] = True
    kv_len = np.concatenate([[s], rng.integers(max(1, s - 40), s + 1, b - 1)]) if b > 1 else np.array([s])
    plan = decode_plan(jnp.asarray(sel), kh, sinks=rng.integers(0, 5, n), window=rng.integers(4, s + 8, n),
                       kv_len=jnp.asarray(kv_len), kv_block=kb)
    return sel, kv_len, plan


def test_plan_mask_matches_numpy_definition():
    rng = np.random.default_rng(0)
    case = CASES[2]
    sel, kv_len, plan = make(case, rng)
    b, n, kh, _, s, kb, _, _ = case
    got = np.asarray(token_mask(plan, s))
    sinks, window = np.asarray(plan.sinks), np.asarray(plan.window)
    for bi in range(b):
        for ni in range(n):
            for si in range(s):
                want = sel[bi, ni, si // kb] and si < kv_len[bi] and (
                    si < sinks[ni] or kv_len[bi] - 1 - si < window[ni])
                assert got[bi, ni, si] == want
    # each group lists the union of its heads' blocks once, ascending
    for bi in range(b):
        for ki in range(kh):
            union = np.flatnonzero(sel[bi, ki * (n // kh):(ki + 1) * (n // kh)].any(0))
            c = int(plan.counts[bi, ki])
            np.testing.assert_array_equal(np.asarray(plan.kv_blocks[bi, ki, :c]), union)


def run_case(backend, case, dtype):
    rng = np.random.default_rng(abs(hash(case)) % 2**32)
    b, n, kh, h, s, kb, kind, splits = case
    _, _, plan = make(case, rng)
    q, k, v = (rng.normal(size=shape).astype(np.float32) for shape in ((b, n, h), (b, s, kh, h), (b, s, kh, h)))
    ref32, lse32 = sparse_decode_attention(*map(jnp.asarray, (q, k, v)), plan, backend="reference")
    args = [jnp.asarray(x, dtype) for x in (q, k, v)]
    out, lse = sparse_decode_attention(*args, plan, backend=backend, interpret=True, splits=splits)
    assert out.shape == (b, n, h) and out.dtype == dtype
    if dtype == jnp.float32:
        tol = 2e-5
    else:
        ref_lp, _ = sparse_decode_attention(*args, plan, backend="reference")
        tol = 2 * float(jnp.abs(ref_lp.astype(jnp.float32) - ref32).max()) + 1e-3
    err = float(jnp.abs(out.astype(jnp.float32) - ref32).max())
    assert err <= tol, f"max error {err:.3e} > derived tolerance {tol:.3e}"
    fin = np.isfinite(np.asarray(lse32))
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), fin)
    np.testing.assert_allclose(np.asarray(lse)[fin], np.asarray(lse32)[fin], atol=20 * tol)
    if kind == "empty":
        assert np.all(np.asarray(out) == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[f"{c[6]}-s{c[4]}-g{c[1] // c[2]}-h{c[3]}" for c in CASES])
def test_bf16_matches_reference(backend, case):
    run_case(backend, case, jnp.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_matches_reference(backend):
    run_case(backend, CASES[2], jnp.float32)


def test_tpu_decode_kernel_lowers_for_tpu():
    from pallas_kernels.sparse_decode.mosaic_tpu import sparse_decode_tpu

    rng = np.random.default_rng(1)
    plan = decode_plan(jnp.asarray(rng.random((1, 8, 8)) < 0.5), 2, sinks=4, window=256, kv_len=1024,
                       kv_block=128)
    q = jax.ShapeDtypeStruct((1, 8, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 2, 1024, 128), jnp.bfloat16)
    exp = jax.export.export(jax.jit(sparse_decode_tpu), platforms=["tpu"])(q, kv, kv, plan)
    assert "tpu_custom_call" in exp.mlir_module()


def test_bad_shapes_and_backends_raise():
    plan = decode_plan(jnp.ones((1, 4, 2), bool), 2, sinks=0, window=64, kv_len=32, kv_block=16)
    q, kv = jnp.ones((1, 4, 64)), jnp.ones((1, 32, 2, 64))
    with pytest.raises(ValueError, match="multiple of K"):
        sparse_decode_attention(jnp.ones((1, 3, 64)), kv, kv, plan)
    with pytest.raises(RuntimeError, match="needs a GPU"):
        sparse_decode_attention(q, kv, kv, plan, backend="triton")
