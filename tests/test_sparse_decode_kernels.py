"""Sparse decode attention: the DecodePlan's semantics against an independent numpy definition, and every
Pallas backend (interpret mode on CPU) against the reference. bf16 tolerance: 2 x the bf16 reference's own
error against fp32 + a small floor."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import check_op_against_reference
from pallas_kernels.block_plan import cdiv
from pallas_kernels.sparse_decode.api import sparse_decode_attention
from pallas_kernels.sparse_decode.plan import decode_plan, decode_token_mask

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
    got = np.asarray(decode_token_mask(plan, s))
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


@pytest.mark.parametrize("max_blocks", [None, 3, 7])
def test_plan_packing_against_numpy(max_blocks):
    """decode_plan's sort-free packing: the first counts entries are the group's union ids ascending (the lowest
    max_blocks of them when capped), padding repeats the last (0 when empty), head_mask marks each head's own
    blocks and nothing past counts."""
    rng = np.random.default_rng(5 if max_blocks is None else max_blocks)
    b, n, kh, sb = 3, 8, 2, 12
    sel = rng.random((b, n, sb)) < 0.3
    sel[1, :4] = False  # an empty group
    plan = decode_plan(jnp.asarray(sel), kh, sinks=0, window=1 << 20, kv_len=jnp.full((b,), sb * 16), kv_block=16,
                       max_blocks=max_blocks)
    m = sb if max_blocks is None else max_blocks
    g = n // kh
    for bi in range(b):
        for ki in range(kh):
            grp = sel[bi, ki * g:(ki + 1) * g]
            want = np.flatnonzero(grp.any(0))[:m]
            c = int(plan.counts[bi, ki])
            blocks = np.asarray(plan.kv_blocks[bi, ki])
            assert c == len(want) and blocks.shape == (m,)
            np.testing.assert_array_equal(blocks[:c], want)
            assert (blocks[c:] == (want[-1] if c else 0)).all()
            hm = np.asarray(plan.head_mask[bi, ki])  # [M, G]
            np.testing.assert_array_equal(hm[:c], grp[:, want].T)
            assert not hm[c:].any()


def run_case(backend, case, dtype):
    rng = np.random.default_rng(abs(hash(case)) % 2**32)
    b, n, kh, h, s, kb, kind, splits = case
    _, _, plan = make(case, rng)
    q, k, v = (rng.normal(size=shape).astype(np.float32) for shape in ((b, n, h), (b, s, kh, h), (b, s, kh, h)))
    op = lambda *qkv, **kw: sparse_decode_attention(*qkv, plan, **kw)
    out = check_op_against_reference(op, (q, k, v), dtype, empty=kind == "empty", backend=backend, interpret=True,
                                     splits=splits)
    assert out.shape == (b, n, h) and out.dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[f"{c[6]}-s{c[4]}-g{c[1] // c[2]}-h{c[3]}" for c in CASES])
def test_bf16_matches_reference(backend, case):
    run_case(backend, case, jnp.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_matches_reference(backend):
    run_case(backend, CASES[2], jnp.float32)


@pytest.mark.parametrize("splits,gather", [(1, 4), (2, 3), (3, 2)])
def test_tpu_decode_walks_long_shares_in_tiles(splits, gather):
    """mosaic_tpu decode over long union lists: each split streams its share of the plan and walks it `gather`
    blocks per K/V tile, several double-buffered tiles per share with a partial last tile; fp32 vs the
    reference, out and lse."""
    from pallas_kernels.sparse_decode import reference
    from pallas_kernels.sparse_decode.mosaic_tpu import sparse_decode_tpu

    case = (2, 8, 2, 64, 608, 16, "random", splits)
    rng = np.random.default_rng(splits * 10 + gather)
    _, _, plan = make(case, rng)
    b, n, kh, h, s = case[:5]
    q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in ((b, n, h), (b, s, kh, h), (b, s, kh, h)))
    assert int(plan.counts.min()) > 2 * splits * gather  # several tiles per share
    hm = lambda x: jnp.swapaxes(x, 1, 2)
    out, lse = sparse_decode_tpu(q, hm(k), hm(v), plan, splits=splits, gather=gather, interpret=True)
    want, want_lse = reference.sparse_decode_attention(q, k, v, plan)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(want_lse), atol=2e-5, rtol=2e-5)


def test_triton_group_wider_than_a_mask_word():
    """G = 64 query heads per KV head: more than the 32 bits of the packed head-mask word, so the kernel
    reads one int32 per head instead (the other cases run the packed word)."""
    run_case("triton", (1, 64, 1, 64, 80, 16, "random", 2), jnp.float32)


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


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("c,n,kh", [(3, 8, 2), (4, 4, 1), (2, 2, 2)])
def test_a_few_query_tokens_equal_one_token_at_a_time(backend, c, n, kh):
    """C tokens per sequence in one call (rows folded so a group holds its heads x tokens, q_shift per row)
    equal C separate one-token decodes at their own positions, each with its own per-head block selection."""
    from pallas_kernels.sparse_decode.api import sparse_decode_tokens
    from pallas_kernels.sparse_decode.plan import fold_tokens, token_shifts

    b, s, h, kb = 2, 300, 64, 16
    rng = np.random.default_rng(c * 10 + n)
    q = jnp.asarray(rng.normal(size=(b, c, n, h)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, s, kh, h)), jnp.float32) for _ in range(2))
    kv_len = jnp.asarray([s, s - 37])
    sel = jnp.asarray(rng.random((b, c, n, cdiv(s, kb))) < 0.4)
    sinks, window = rng.integers(0, 20, n), rng.integers(30, 400, n)
    plan = decode_plan(fold_tokens(sel, kh), kh, sinks=np.repeat(sinks, c), window=np.repeat(window, c),
                       kv_len=kv_len, kv_block=kb, q_shift=token_shifts(n, c))
    out, lse = sparse_decode_tokens(q, k, v, plan, backend=backend, interpret=True)
    for ci in range(c):
        one = decode_plan(sel[:, ci], kh, sinks=sinks, window=window, kv_len=kv_len - (c - 1 - ci), kv_block=kb)
        want, want_lse = sparse_decode_attention(q[:, ci], k, v, one, backend="reference")
        np.testing.assert_allclose(np.asarray(out[:, ci]), np.asarray(want), atol=2e-5)
        np.testing.assert_array_equal(np.isfinite(lse[:, ci]), np.isfinite(want_lse))


def test_triton_decode_kernel_lowers_for_an_h100():
    """The Triton-lowered decode kernel (with per-row shifts) lowers for an abstract H100 from CPU."""
    from jax.sharding import AbstractDevice, AbstractMesh, AxisType

    from pallas_kernels.sparse_decode.plan import DecodePlan
    from pallas_kernels.sparse_decode.triton import sparse_decode_triton

    b, n, kh, s, h, kb, m = 2, 32, 8, 4096, 128, 64, 64
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    bf = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)

    def run(q, k, v, blocks, counts, hm, sinks, window, kv_len, shift):
        return sparse_decode_triton(q, k, v, DecodePlan(blocks, counts, hm, sinks, window, kv_len, kb, shift))

    dev = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    with jax.sharding.use_abstract_mesh(AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=dev)):
        low = jax.jit(run).trace(bf(b, n, h), bf(b, s, kh, h), bf(b, s, kh, h), i32(b, kh, m), i32(b, kh),
                                 jax.ShapeDtypeStruct((b, kh, m, n // kh), jnp.bool_), i32(n), i32(n), i32(b),
                                 i32(n)).lower(lowering_platforms=("cuda",))
    assert "rtpurbo_sparse_decode" in low.as_text()


@pytest.mark.parametrize("backend", ["triton", "reference", "mosaic_tpu"])
def test_a_layer_of_a_stacked_cache_equals_that_layer_alone(backend):
    """`layer=` (a scanned layer's stacked cache [L, B, S, K, H], the layer traced) attends over that layer: the
    same output and lse as the layer's own slice, bit for bit (triton reads it in place; the others slice)."""
    rng = np.random.default_rng(5)
    case = (2, 8, 2, 64, 192, 32, "random", 2)
    sel, kv_len, plan = make(case, rng)
    b, n, kh, h, s = case[:5]
    q = jnp.asarray(rng.normal(size=(b, n, h)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(3, b, s, kh, h)), jnp.float32) for _ in range(2))
    run = jax.jit(lambda q, k, v, layer: sparse_decode_attention(q, k, v, plan, layer=layer, backend=backend,
                                                                  interpret=True))
    for layer in (0, 2):
        got = run(q, k, v, jnp.int32(layer))
        want = sparse_decode_attention(q, k[layer], v[layer], plan, backend=backend, interpret=True)
        for a, w in zip(got, want):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(w))
    with pytest.raises(ValueError, match="L, B, S, K, H"):
        sparse_decode_attention(q, k[0], v[0], plan, layer=jnp.int32(0), backend=backend, interpret=True)


def test_stacked_triton_decode_kernel_lowers_for_an_h100():
    """The in-place read of one layer of a stack lowers for an abstract H100 from CPU."""
    from jax.sharding import AbstractDevice, AbstractMesh, AxisType

    from pallas_kernels.sparse_decode.plan import DecodePlan
    from pallas_kernels.sparse_decode.triton import sparse_decode_triton

    l, b, n, kh, s, h, kb, m = 4, 2, 32, 8, 4096, 128, 64, 64
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    bf = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)

    def run(q, k, v, blocks, counts, hm, sinks, window, kv_len, layer):
        return sparse_decode_triton(q, k, v, DecodePlan(blocks, counts, hm, sinks, window, kv_len, kb), layer=layer)

    dev = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    with jax.sharding.use_abstract_mesh(AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=dev)):
        low = jax.jit(run).trace(bf(b, n, h), bf(l, b, s, kh, h), bf(l, b, s, kh, h), i32(b, kh, m), i32(b, kh),
                                 jax.ShapeDtypeStruct((b, kh, m, n // kh), jnp.bool_), i32(n), i32(n), i32(b),
                                 i32()).lower(lowering_platforms=("cuda",))
    assert "rtpurbo_sparse_decode" in low.as_text()
