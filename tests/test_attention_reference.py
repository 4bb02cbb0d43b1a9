"""The block-sparse attention reference and BlockPlan semantics against independent numpy definitions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pallas_kernels.block_plan import FULL_WINDOW, band_plan, cdiv, plan_from_selection, plan_to_dense_mask
from pallas_kernels.sparse_attention.reference import attention, block_sparse_attention
from tests import np_reference as npr


def _qkv(rng, b, t, s, n, kh, h, dtype=np.float32):
    return (rng.normal(size=(b, t, n, h)).astype(dtype), rng.normal(size=(b, s, kh, h)).astype(dtype),
            rng.normal(size=(b, s, kh, h)).astype(dtype))


@pytest.mark.parametrize("t,n,kh,sinks,window", [(37, 4, 4, 0, FULL_WINDOW), (65, 6, 2, 4, 9), (130, 8, 1, 3, 64),
                                                  (64, 3, 1, 1, 1)])
def test_local_attention_matches_band_mask(t, n, kh, sinks, window):
    rng = np.random.default_rng(t)
    q, k, v = _qkv(rng, 2, t, t, n, kh, 16)
    ours = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), sinks=sinks, window=window, chunk=32)
    mask = np.broadcast_to(npr.band_mask(t, t, sinks, min(window, 10**6), 0, n), (2, n, t, t))
    np.testing.assert_allclose(ours, npr.attention(q, k, v, mask), atol=2e-5, rtol=2e-5)


def test_decode_offset_and_padding():
    rng = np.random.default_rng(0)
    q, k, v = _qkv(rng, 3, 2, 70, 4, 2, 8)  # two query tokens at positions 68, 69
    lengths = np.array([70, 41, 5])
    ours = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), sinks=2, window=30, lengths=jnp.asarray(lengths))
    mask = np.broadcast_to(npr.band_mask(2, 70, 2, 30, 68, 4), (3, 4, 2, 70)).copy()
    mask &= (np.arange(70)[None, :] < lengths[:, None])[:, None, None, :]
    np.testing.assert_allclose(ours, npr.attention(q, k, v, mask), atol=2e-5, rtol=2e-5)
    # row 2 sees only its 5 keys (2 sinks + nothing in the window): still finite
    assert np.isfinite(np.asarray(ours)).all()


def _random_plan(rng, b, n, t, s, qb, kb, q_offset=0):
    tb, sb = cdiv(t, qb), cdiv(s, kb)
    sel = rng.random((b, n, tb, sb)) < rng.uniform(0.1, 0.9)
    sel[0, 0, 0] = False  # an empty row: its queries must output zeros
    return plan_from_selection(jnp.asarray(sel), sinks=rng.integers(0, 5, n), window=rng.integers(1, s + 5, n),
                               kv_len=rng.integers(1, s + 1, b), q_block=qb, kv_block=kb, q_offset=q_offset)


@pytest.mark.parametrize("b,t,s,n,kh,h,qb,kb,off", [(1, 64, 64, 4, 4, 64, 16, 16, 0), (2, 33, 33, 8, 1, 128, 16, 8, 0),
                                                     (2, 17, 95, 6, 3, 32, 8, 32, 78), (1, 1, 129, 4, 1, 16, 1, 64, 128)])
def test_block_sparse_matches_dense_masked(b, t, s, n, kh, h, qb, kb, off):
    rng = np.random.default_rng(s)
    q, k, v = _qkv(rng, b, t, s, n, kh, h)
    plan = _random_plan(rng, b, n, t, s, qb, kb, off)
    mask = np.asarray(plan_to_dense_mask(plan, t, s))
    ours = block_sparse_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), plan, chunk=16)
    np.testing.assert_allclose(ours, npr.attention(q, k, v, mask), atol=3e-5, rtol=3e-5)
    assert np.all(np.asarray(ours)[0, :min(qb, t), 0] == 0)  # the empty plan row


def test_plan_to_dense_mask_of_band_plan_is_band_mask():
    plan = band_plan(1, 3, 50, 50, sinks=[0, 2, 4], window=[50, 7, 1], q_block=8, kv_block=16)
    expect = npr.band_mask(50, 50, [0, 2, 4], [50, 7, 1], 0, 3)
    np.testing.assert_array_equal(np.asarray(plan_to_dense_mask(plan, 50, 50))[0], expect)


@settings(max_examples=20, deadline=None)  # each example compiles its own program
@given(t=st.integers(1, 90), qb=st.sampled_from([1, 8, 16]), kb=st.sampled_from([4, 16, 64]),
       sinks=st.integers(0, 8), window=st.integers(1, 100), extra=st.integers(0, 20))
def test_band_plan_properties(t, qb, kb, sinks, window, extra):
    s = t + extra

    @jax.jit  # one program per example: eager, each of the plan's small ops compiled on its own took ~10x longer
    def build():
        plan = band_plan(1, 1, t, s, sinks=sinks, window=window, q_block=qb, kv_block=kb, q_offset=extra)
        return plan.kv_blocks, plan.counts, plan_to_dense_mask(plan, t, s)

    blocks, counts, dense = (np.asarray(x)[0, 0] for x in build())
    expect = npr.band_mask(t, s, sinks, window, extra, 1)[0]
    np.testing.assert_array_equal(dense, expect)  # the plan loses no visible token
    for tb in range(len(counts)):
        ids = blocks[tb, :counts[tb]]
        last_q = extra + min((tb + 1) * qb, t) - 1
        assert np.all(ids * kb <= last_q), "a plan holds a future block"
        assert np.all(np.diff(ids) > 0), "plan entries must be ascending and unique"
        for kb_id in ids:  # every listed block has at least one visible token (no wasted visits)
            assert dense[tb * qb:(tb + 1) * qb, kb_id * kb:(kb_id + 1) * kb].any()
