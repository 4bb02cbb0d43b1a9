"""Indexer scoring and dynamic top-p selection: exactness, minimality, forced blocks, budgets, causality."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pallas_kernels.block_plan import cdiv, plan_from_selection, plan_to_dense_mask
from pallas_kernels.indexer_topp.reference import block_stats, topp_select, topp_selection_at
from rtpurbo_jax.indexer import group_keys, project_keys, project_queries


def test_block_stats_match_numpy():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(3, 70)).astype(np.float32) * 4
    vis = rng.random((3, 70)) < 0.7
    vis[1, :] = False
    mx, lse = block_stats(jnp.asarray(scores), jnp.asarray(vis), 16)
    for r in range(3):
        for b in range(cdiv(70, 16)):
            sl = slice(b * 16, min(b * 16 + 16, 70))
            x = scores[r, sl][vis[r, sl]]
            if x.size == 0:
                assert mx[r, b] == -np.inf and lse[r, b] == -np.inf
            else:
                np.testing.assert_allclose(mx[r, b], x.max(), rtol=1e-6)
                np.testing.assert_allclose(lse[r, b], np.log(np.exp(x.astype(np.float64)).sum()), rtol=1e-5)


def test_index_projections_use_the_group_kv_head():
    rng = np.random.default_rng(1)
    q_pre, k_pre = rng.normal(size=(1, 5, 6, 8)), rng.normal(size=(1, 7, 2, 8))
    w_q, w_k = rng.normal(size=(6, 8, 4)), rng.normal(size=(6, 8, 4))
    qi = project_queries(jnp.asarray(q_pre), jnp.asarray(w_q))
    ki = project_keys(group_keys(jnp.asarray(k_pre), 6), jnp.asarray(w_k))
    np.testing.assert_allclose(qi[0, :, 4], q_pre[0, :, 4] @ w_q[4], rtol=1e-5)
    np.testing.assert_allclose(ki[0, :, 4], k_pre[0, :, 1] @ w_k[4], rtol=1e-5)  # head 4 of 6 -> kv head 1 of 2
    some = group_keys(jnp.asarray(k_pre), 6, jnp.asarray([4, 1, 4]))  # a subset of heads, repeats allowed
    np.testing.assert_array_equal(np.asarray(some), k_pre.astype(np.float32)[:, :, [1, 0, 1]])


@settings(max_examples=30, deadline=None)
@given(sb=st.integers(1, 40), p=st.floats(0.05, 1.0), seed=st.integers(0, 10**6), budget=st.one_of(st.none(), st.integers(1, 8)))
def test_topp_select_properties(sb, p, seed, budget):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=sb) * rng.uniform(0.1, 6)
    visible = rng.random(sb) < 0.8
    visible[rng.integers(sb)] = True
    mass = np.where(visible, np.exp(logits), 0)
    mass = mass / mass.sum()
    forced = (rng.random(sb) < 0.15) & visible
    sel = np.asarray(topp_select(jnp.asarray(mass, jnp.float32), jnp.asarray(visible), jnp.asarray(forced), p, budget))
    assert not (sel & ~visible).any(), "selected an invisible block"
    if budget is not None:
        assert sel.sum() <= budget
        if forced.sum() <= budget:
            assert (sel | ~forced).all(), "a forced block was dropped under a budget it fits"
        return
    assert (sel | ~forced).all(), "a forced block was dropped"
    if p >= 1.0:
        np.testing.assert_array_equal(sel, visible)
        return
    kept = mass[sel].sum()
    assert kept >= p - 1e-5 or sel.sum() == visible.sum(), "kept mass below p"
    added = sel & ~forced
    if added.any():
        lowest = np.where(added, mass, np.inf).argmin()
        assert kept - mass[lowest] < p + 1e-6, "not minimal: dropping the lowest-mass added block keeps mass >= p"


def test_forced_blocks_under_budget_come_first():
    mass = jnp.asarray([0.01, 0.5, 0.3, 0.19])
    sel = topp_select(mass, jnp.ones(4, bool), jnp.asarray([True, False, False, True]), 0.9, max_blocks=3)
    np.testing.assert_array_equal(np.asarray(sel), [True, True, False, True])


@pytest.mark.parametrize("t,s_extra,qb,kb", [(50, 0, 16, 8), (1, 99, 1, 16), (33, 31, 8, 16)])
def test_topp_plan_is_causal_and_reaches_p(t, s_extra, qb, kb):
    rng = np.random.default_rng(t)
    s, n, i = t + s_extra, 3, 4
    q_idx = jnp.asarray(rng.normal(size=(2, t, n, i)) * 2, jnp.float32)
    k_idx = jnp.asarray(rng.normal(size=(2, s, n, i)) * 2, jnp.float32)
    kv_len = jnp.asarray([s, s - 3])
    q_pos = jnp.broadcast_to(s_extra + jnp.arange(t), (2, t))
    pad = cdiv(t, qb) * qb - t  # the selection wants whole tiles: padding rows (position -1) are ignored
    sel = topp_selection_at(jnp.pad(q_idx, ((0, 0), (0, pad), (0, 0), (0, 0))), k_idx,
                            jnp.pad(q_pos, ((0, 0), (0, pad)), constant_values=-1), kv_len, top_p=0.7, tile=qb,
                            kv_block=kb, sinks=2, keep_recent=1)
    plan = plan_from_selection(sel, sinks=0, window=10 ** 9, kv_len=kv_len, q_block=qb, kv_block=kb,
                               q_offset=s_extra)
    dense = np.asarray(plan_to_dense_mask(plan, t, s))
    assert not np.triu(np.ones((t, s), bool), k=s_extra + 1)[None, None].__and__(dense).any(), "future token"
    assert not dense[1, :, :, s - 3:].any(), "padding key selected"
    # per tile, the mean (over its queries) indexer mass on the selected tokens reaches p
    scores = np.einsum("btni,bsni->bnts", np.asarray(q_idx, np.float64), np.asarray(k_idx, np.float64))
    causal = np.arange(s)[None, :] <= (s_extra + np.arange(t))[:, None]
    lens = np.array([s, s - 3])
    for b in range(2):
        vis = causal & (np.arange(s) < lens[b])[None]
        w = np.where(vis, np.exp(scores[b] - np.where(vis, scores[b], -np.inf).max(-1, keepdims=True)), 0)
        w = w / w.sum(-1, keepdims=True)
        valid_rows = min(t, lens[b] - s_extra)  # query rows past a sequence's length are padding
        for tb in range(cdiv(valid_rows, qb)):
            rows = slice(tb * qb, min(valid_rows, tb * qb + qb))
            got = (w[:, rows] * dense[b, :, rows]).sum(-1).mean(-1)
            assert (got >= 0.7 - 1e-4).all(), got
    assert (np.asarray(plan.counts) < cdiv(s, kb)).any(), "p=0.7 should not select everything on random scores"


def test_topp_selection_p1_is_dense_causal():
    rng = np.random.default_rng(3)
    q_idx = jnp.asarray(rng.normal(size=(1, 40, 2, 4)), jnp.float32)
    sel = np.asarray(topp_selection_at(q_idx, q_idx, jnp.arange(40)[None], jnp.asarray([40]), top_p=1.0, tile=8,
                                       kv_block=8))
    np.testing.assert_array_equal(sel[0, 0], np.tril(np.ones((5, 5), bool)))


@pytest.mark.parametrize("c,start,s,tile,kb,bias,kdt", [(40, (0, 7), 47, 8, 8, False, "bfloat16"),
                                                         (37, (60, 3), 131, 16, 16, True, "bfloat16"),
                                                         (16, (32, 20), 48, 16, 4, True, "bfloat16"),
                                                         (16, (32, 20), 48, 16, 4, True, "float8_e4m3fn")])
def test_prefill_tile_masses_and_selection_backends_match_the_reference(c, start, s, tile, kb, bias, kdt):
    """The one-launch tile-mass kernel (Triton lowering, interpret mode) gives the reference's per-tile block
    masses; every backend then selects the reference's blocks: ragged starts and kv_len, a partial last tile
    (padding rows), keys past kv_len, S not a multiple of the block, the local prior, bf16 and float8 index keys."""
    from pallas_kernels.indexer_topp.api import prefill_selection
    from pallas_kernels.indexer_topp.prefill_triton import tile_block_mass_triton
    from pallas_kernels.indexer_topp.reference import tile_bounds, tile_masses

    rng = np.random.default_rng(c + s)
    b, r, i = 2, 3, 8
    cp = cdiv(c, tile) * tile
    q_idx = jnp.asarray(rng.normal(size=(b, cp, r, i)) * 1.5, jnp.float32)
    k_idx = jnp.asarray(rng.normal(size=(b, s, r, i)) * 1.5, jnp.float32).astype(kdt)
    st = jnp.asarray(start, jnp.int32)
    q_pos = st[:, None] + jnp.arange(cp, dtype=jnp.int32)[None]
    q_pos = jnp.where(jnp.arange(cp)[None] < c - jnp.asarray([0, 5])[:, None], q_pos, -1)  # row 1: 5 fewer rows
    kv_len = jnp.minimum(jnp.max(q_pos, axis=1) + 1, s).astype(jnp.int32)
    lb = jnp.asarray(rng.normal(size=(b, cp, r)), jnp.float32) if bias else None
    opts = dict(tile=tile, kv_block=kb, sinks=3, keep_recent=8)
    mass, visible, forced = tile_masses(q_idx, k_idx.astype(jnp.float32), q_pos, kv_len, local_bias=lb, **opts)
    pos, _, forced_t = tile_bounds(q_pos, kv_len, tile=tile, num_kv_blocks=cdiv(s, kb), kv_block=kb, sinks=3,
                                   keep_recent=8)
    kp = jnp.pad(k_idx, ((0, 0), (0, cdiv(s, kb) * kb - s), (0, 0), (0, 0)))
    got = tile_block_mass_triton(q_idx, kp, pos, kv_len, forced_t, lb, tile=tile, kv_block=kb, interpret=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(mass), atol=2e-6, rtol=1e-4)
    assert np.asarray(mass).sum(-1)[np.asarray(visible).any(-1)] == pytest.approx(1.0, abs=1e-4)  # real masses
    want = np.asarray(topp_selection_for(q_idx, k_idx, q_pos, kv_len, lb, opts))
    assert 0 < want.sum() < np.asarray(visible).sum(), "p=0.7 should select some but not all visible blocks"
    for backend in ("xla", "triton"):
        sel = prefill_selection(q_idx, k_idx, q_pos, kv_len, top_p=0.7, local_bias=lb, backend=backend,
                                interpret=True, **opts)
        np.testing.assert_array_equal(np.asarray(sel), want, err_msg=backend)


def topp_selection_for(q_idx, k_idx, q_pos, kv_len, lb, opts):
    return topp_selection_at(q_idx, k_idx.astype(jnp.float32), q_pos, kv_len, top_p=0.7, local_bias=lb, **opts)


@pytest.mark.parametrize("b,r,s,kb,bpp,kdt", [(2, 3, 200, 16, 4, "float32"), (1, 4, 1000, 64, 8, "float32"),
                                              (3, 1, 77, 8, 2, "float32"), (1, 2, 64, 64, 1, "float32"),
                                              (2, 3, 300, 16, 4, "float8_e4m3fn")])
def test_fused_decode_scoring_selects_like_the_reference(b, r, s, kb, bpp, kdt):
    """The Pallas (Triton lowering, interpret mode) scoring + block-LSE kernel gives the reference's top-p blocks
    (fp32 index keys, and float8 ones as `SparseConfig.index_dtype` stores them)."""
    from pallas_kernels.indexer_topp.api import decode_selection
    from pallas_kernels.indexer_topp.triton import block_lse_triton

    rng = np.random.default_rng(s)
    q = jnp.asarray(rng.normal(size=(b, r, 16)) * 1.5, jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, s, r, 16)), jnp.float32).astype(kdt)
    kvl = jnp.asarray(rng.integers(s // 2, s + 1, b))
    kw = dict(top_p=0.8, kv_block=kb, sinks=4, keep_recent=10)
    want = np.asarray(decode_selection(q, k, kvl, backend="reference", **kw))
    got = np.asarray(decode_selection(q, k, kvl, backend="triton", interpret=True, bpp=bpp, **kw))
    np.testing.assert_array_equal(got, want)
    assert want.any() and (cdiv(s, kb) == 1 or not want.all()), "a selection test needs a real choice"
    # the kernel's block LSE against numpy
    sp = cdiv(s, kb * bpp) * kb * bpp
    kp = jnp.pad(k, ((0, 0), (0, sp - s), (0, 0), (0, 0)))
    lse = np.asarray(block_lse_triton(q, kp, kvl, kv_block=kb, bpp=bpp, interpret=True))
    sc = np.einsum("bri,bsri->brs", np.asarray(q, np.float64), np.asarray(kp, np.float64))
    sc = np.where(np.arange(sp) < np.asarray(kvl)[:, None, None], sc, -np.inf).reshape(b, r, sp // kb, kb)
    with np.errstate(divide="ignore"):
        ref = np.log(np.exp(sc).sum(-1))
    fin = np.isfinite(ref)
    np.testing.assert_array_equal(np.isfinite(lse), fin)
    np.testing.assert_allclose(lse[fin], ref[fin], rtol=1e-5, atol=1e-5)


def test_topp_select_with_ties_matches_stable_sort_definition():
    """Exact semantics with tied masses: keep forced blocks, then candidates in stable descending order (lower
    block id first among ties) while the mass kept before each one is below p."""
    rng = np.random.default_rng(7)
    for it in range(60):
        n = int(rng.integers(1, 30))
        vis = rng.random((4, 30)) < 0.8
        vis[:, n:] = False  # rows of n blocks padded to 30 invisible ones: one compilation per p
        raw = rng.integers(0, 4, (4, 30)).astype(np.float64)
        mass = np.where(vis, raw, 0.0)
        mass = mass / np.maximum(mass.sum(-1, keepdims=True), 1e-9)
        forced = rng.random((4, 30)) < 0.15
        p = float(rng.choice([0.3, 0.6, 0.9, 0.999]))
        got = np.asarray(topp_select(jnp.asarray(mass, jnp.float32), jnp.asarray(vis), jnp.asarray(forced), p))
        m32 = mass.astype(np.float32)
        for r in range(4):
            f = forced[r] & vis[r]
            want = f.copy()
            kept = np.float32(m32[r][f].sum(dtype=np.float32))
            cand = [i for i in sorted(np.flatnonzero(vis[r] & ~f), key=lambda i: (-m32[r][i], i))]
            for i in cand:
                if kept >= p:
                    break
                want[i] = True
                kept = np.float32(kept + m32[r][i])
            np.testing.assert_array_equal(got[r], want, err_msg=f"case {it} row {r} p={p}")


def _plans_equal(got, want, seq_len):
    from pallas_kernels.sparse_decode.plan import decode_token_mask

    np.testing.assert_array_equal(np.asarray(got.counts), np.asarray(want.counts))
    c = np.asarray(want.counts)
    for b, k in np.ndindex(*c.shape):
        np.testing.assert_array_equal(np.asarray(got.kv_blocks)[b, k, :c[b, k]], np.asarray(want.kv_blocks)[b, k, :c[b, k]])
        np.testing.assert_array_equal(np.asarray(got.head_mask)[b, k, :c[b, k]], np.asarray(want.head_mask)[b, k, :c[b, k]])
        # padding entries repeat the last id and use no head (the DecodePlan contract)
        assert np.all(np.asarray(got.kv_blocks)[b, k, c[b, k]:] == (np.asarray(want.kv_blocks)[b, k, c[b, k] - 1]
                                                                    if c[b, k] else 0))
        assert not np.asarray(got.head_mask)[b, k, c[b, k]:].any()
    np.testing.assert_array_equal(np.asarray(decode_token_mask(got, seq_len)),
                                  np.asarray(decode_token_mask(want, seq_len)))


@pytest.mark.parametrize("b,n,kh,s,kb,p,retrieval", [(2, 8, 2, 1000, 16, 0.9, (0, 3, 6, 7)),
                                                     (1, 6, 2, 500, 16, 0.8, (0, 4)),
                                                     (1, 4, 4, 333, 32, 0.5, (1,)),
                                                     (3, 8, 1, 700, 64, 0.95, (0, 1, 2, 3, 4, 5, 6, 7)),
                                                     (2, 4, 1, 129, 8, 1.0, (2,))])
@pytest.mark.parametrize("backend", ["triton", "xla"])
def test_decode_plan_backends_match_the_reference(b, n, kh, s, kb, p, retrieval, backend):
    """Scoring kernel + sort-free top-p / packing kernels (Triton lowering, interpret mode), and the XLA
    sort-free top-p + packing (backend "xla", the TPU path), build the same DecodePlan as the sort-based
    reference: mixed retrieval / local heads per group, ragged lengths, a row below seqlen_threshold (dense),
    block counts that are not powers of two."""
    from pallas_kernels.indexer_topp.api import decode_plan_select

    rng = np.random.default_rng(s + n)
    r = len(retrieval)
    q = jnp.asarray(rng.normal(size=(b, r, 16)) * 1.5, jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, s, r, 16)), jnp.float32)
    kvl = jnp.asarray(rng.integers(s // 3, s + 1, b))
    kw = dict(retrieval=retrieval, num_kv_heads=kh, head_sinks=rng.integers(0, 9, n),
              head_window=rng.integers(20, 200, n), top_p=p, kv_block=kb, sinks=4, keep_recent=10,
              dense=jnp.arange(b) == 1)
    want = decode_plan_select(q, k, kvl, backend="reference", **kw)
    got = decode_plan_select(q, k, kvl, backend=backend, interpret=True, **kw)
    _plans_equal(got, want, s)
    assert 0 < np.asarray(want.counts).min() and np.asarray(want.counts).max() < cdiv(s, kb) or p == 1.0


def test_fused_topp_plan_kernel_ties_follow_the_stable_sort_rule():
    """Masses with many exact ties (lse from 3 integer weights): the bisection boundary plus index-order tie
    ranks keep exactly the stable descending order's prefix; p is kept away from every partial sum."""
    from pallas_kernels.indexer_topp.plan_triton import decode_plan_triton

    rng = np.random.default_rng(11)
    g, sbp, kb = 4, 64, 16
    for it in range(8):
        w = rng.integers(1, 4, (1, g, sbp)).astype(np.float64)
        kv_len = int(rng.integers(200, sbp * kb + 1))
        nb = cdiv(kv_len, kb)
        w[..., nb:] = 0
        forced = np.zeros(sbp, bool)
        forced[0] = True
        forced[(kv_len - 1) // kb] = True
        forced[nb:] = False
        # choose p away from every partial sum of every head (stable order: weight desc, then block id)
        cums = []
        for h in range(g):
            tot = w[0, h].sum()
            cand = sorted(np.flatnonzero(~forced[:nb]), key=lambda i: (-w[0, h, i], i))
            cums.append((w[0, h, forced].sum() + np.cumsum([w[0, h, i] for i in cand])) / tot)
        p = next(x for x in rng.uniform(0.2, 0.95, 100) if min(np.abs(c - x).min() for c in cums) > 1e-3)
        with np.errstate(divide="ignore"):
            lse = jnp.asarray(np.log(w), jnp.float32)
        blocks, counts, hm = decode_plan_triton(
            lse, jnp.ones(g, jnp.int32), jnp.zeros(g, jnp.int32), jnp.zeros(g, jnp.int32), jnp.asarray([kv_len]),
            jnp.zeros(1, jnp.int32), num_kv_heads=1, top_p=float(p), kv_block=kb, sinks=1, keep_recent=1,
            interpret=True)
        for h in range(g):
            tot = w[0, h].sum()
            want = forced[:sbp].copy()
            kept = w[0, h, forced].sum() / tot
            for i in sorted(np.flatnonzero(~forced[:nb]), key=lambda i: (-w[0, h, i], i)):
                if kept >= p:
                    break
                want[i] = True
                kept += w[0, h, i] / tot
            c = int(counts[0, 0])
            got = np.zeros(sbp, bool)
            got[np.asarray(blocks)[0, 0, :c][np.asarray(hm)[0, 0, h, :c] != 0]] = True
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("backend", ["triton", "xla", "reference"])
def test_decode_plan_from_a_layer_of_a_stacked_index_cache(backend):
    """`layer=` (a scanned layer's stacked index keys [L, B, S, R, I], the layer traced) plans that layer: the
    same DecodePlan as its own slice (triton scores it in place, the others slice); also S not a multiple of
    the block (the slice-and-pad path)."""
    from pallas_kernels.indexer_topp.api import decode_plan_select

    rng = np.random.default_rng(3)
    b, n, kh, kb, retrieval = 2, 8, 2, 16, (0, 3, 6)
    for s in (512, 500):
        q = jnp.asarray(rng.normal(size=(b, len(retrieval), 16)) * 1.5, jnp.float32)
        k = jnp.asarray(rng.normal(size=(3, b, s, len(retrieval), 16)), jnp.float32)
        kvl = jnp.asarray(rng.integers(s // 3, s + 1, b))
        kw = dict(retrieval=retrieval, num_kv_heads=kh, head_sinks=rng.integers(0, 9, n), head_window=rng.integers(20, 200, n),
                  top_p=0.9, kv_block=kb, sinks=4, keep_recent=10, backend=backend, interpret=True)
        run = jax.jit(lambda q, k, kvl, layer: decode_plan_select(q, k, kvl, layer=layer, **kw))
        for layer in (0, 2):
            got, want = run(q, k, kvl, jnp.int32(layer)), decode_plan_select(q, k[layer], kvl, **kw)
            for a, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(w))


@pytest.mark.parametrize("backend", ["triton", "xla", "reference"])
def test_shared_key_slots_select_as_the_keys_repeated_per_head(backend):
    """Index keys stored once per KV group (`key_slot`: K slots [B, S, K, I], head r reads slot key_slot[r]; groups
    of 2, 1 and 3 heads, so the kernel pads a group to 4 queries) give the same decode plan, decode selection and
    prefill selection as the same keys repeated into one row per head — in place from a stacked cache too."""
    from pallas_kernels.indexer_topp.api import (decode_plan_select, decode_selection, expand_slots,
                                                 prefill_selection)

    rng = np.random.default_rng(5)
    b, n, kh, kb, s = 2, 12, 3, 16, 400
    retrieval, key_slot = (0, 1, 4, 8, 9, 10), (0, 0, 1, 2, 2, 2)
    q = jnp.asarray(rng.normal(size=(b, len(retrieval), 16)) * 1.5, jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, b, s, 3, 16)), jnp.float32)  # 3 layers of 3 slots
    kvl = jnp.asarray([s, 250])
    kw = dict(retrieval=retrieval, num_kv_heads=kh, head_sinks=rng.integers(0, 9, n),
              head_window=rng.integers(20, 200, n), top_p=0.9, kv_block=kb, sinks=4, keep_recent=10,
              backend=backend, interpret=True)
    want = decode_plan_select(q, expand_slots(k[1], key_slot), kvl, **kw)
    for got in (decode_plan_select(q, k[1], kvl, key_slot=key_slot, **kw),
                jax.jit(lambda q, k, kvl, layer: decode_plan_select(q, k, kvl, layer=layer, key_slot=key_slot, **kw))(
                    q, k, kvl, jnp.int32(1))):
        for a, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(w))
    sk = dict(top_p=0.9, kv_block=kb, sinks=4, keep_recent=10, backend=backend, interpret=True)
    np.testing.assert_array_equal(np.asarray(decode_selection(q, k[0], kvl, key_slot=key_slot, **sk)),
                                  np.asarray(decode_selection(q, expand_slots(k[0], key_slot), kvl, **sk)))
    qp = jnp.asarray(rng.normal(size=(b, 32, len(retrieval), 16)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(200, 232), (b, 32))
    np.testing.assert_array_equal(
        np.asarray(prefill_selection(qp, k[2], pos, kvl, tile=16, key_slot=key_slot, **sk)),
        np.asarray(prefill_selection(qp, expand_slots(k[2], key_slot), pos, kvl, tile=16, **sk)))
    with pytest.raises(ValueError, match="key_slot"):
        decode_selection(q, k[0], kvl, key_slot=(0, 1, 2, 3, 0, 0), **sk)  # slot 3 of 3
    with pytest.raises(ValueError, match="pass key_slot"):
        decode_selection(q, k[0], kvl, **sk)


def test_grouped_scoring_kernel_lowers_for_an_h100():
    """The scoring kernel with grouped queries (one program per key slot scores its 4 heads) lowers through
    Pallas' Triton lowering for an abstract H100, in place from a stack too."""
    from jax.sharding import AbstractDevice, AbstractMesh, AxisType

    from pallas_kernels.indexer_topp.triton import block_lse_triton

    dev = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    for layers in (None, 3):
        with jax.sharding.use_abstract_mesh(AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=dev)):
            low = jax.jit(lambda q, k, kvl, layer: block_lse_triton(q, k, kvl, layer=layer, kv_block=64, bpp=8)).trace(
                jax.ShapeDtypeStruct((2, 3, 4, 16), jnp.float32),
                jax.ShapeDtypeStruct((layers or 1,) * (layers is not None) + (2, 2048 * 64, 3, 16), jnp.bfloat16),
                jax.ShapeDtypeStruct((2,), jnp.int32),
                None if layers is None else jax.ShapeDtypeStruct((), jnp.int32)).lower(lowering_platforms=("cuda",))
        assert "rtpurbo_index_block_lse" in low.as_text()


def test_decode_selection_kernels_lower_for_an_h100():
    """Both decode selection kernels lower through Pallas' Triton lowering for an abstract H100 (catches
    primitives the lowering lacks, which interpret mode does not), for bf16 index keys and float8 ones
    (`SparseConfig.index_dtype`), and the scoring kernel reading one layer of a stack in place."""
    for kdt in (jnp.bfloat16, jnp.float8_e4m3fn):
        _lower_decode_selection(8, 4, 2048, 64, kdt)
    _lower_decode_selection(2, 4, 2048, 64, jnp.bfloat16, layers=3)


def _lower_decode_selection(b, r, sbp, kb, kdt, layers=None):
    import jax
    from jax.sharding import AbstractDevice, AbstractMesh, AxisType

    from pallas_kernels.indexer_topp.plan_triton import decode_plan_triton
    from pallas_kernels.indexer_topp.triton import block_lse_triton

    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)

    def both(q, k, kv_len, isr, hs, hw, dense, layer):
        lse = block_lse_triton(q, k, kv_len, layer=layer, kv_block=kb, bpp=8)
        return decode_plan_triton(lse, isr, hs, hw, kv_len, dense, num_kv_heads=1, top_p=0.9, kv_block=kb,
                                  sinks=4, keep_recent=64)

    dev = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    with jax.sharding.use_abstract_mesh(AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=dev)):
        low = jax.jit(both).trace(jax.ShapeDtypeStruct((b, r, 16), jnp.float32),
                                  jax.ShapeDtypeStruct((layers or 1,) * (layers is not None) + (b, sbp * kb, r, 16), kdt),
                                  i32(b), i32(r), i32(r), i32(r), i32(b),
                                  None if layers is None else i32()).lower(lowering_platforms=("cuda",))
    text = low.as_text()
    for name in ("rtpurbo_index_block_lse", "rtpurbo_decode_topp_select", "rtpurbo_decode_topp_plan"):
        assert name in text


def test_prefill_tile_mass_kernel_lowers_for_an_h100():
    """The prefill tile-mass kernel lowers through Pallas' Triton lowering for an abstract H100 (128-row tiles,
    64-key blocks, bf16 and float8 index keys, 16 index dims)."""
    import jax
    from jax.sharding import AbstractDevice, AbstractMesh, AxisType

    from pallas_kernels.indexer_topp.prefill_triton import tile_block_mass_triton

    b, c, r, s = 1, 512, 4, 8192
    f = lambda q, k, pos, kv_len, forced, bias: tile_block_mass_triton(q, k, pos, kv_len, forced, bias, tile=128,
                                                                      kv_block=64)
    dev = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    for kdt in (jnp.bfloat16, jnp.float8_e4m3fn):
        with jax.sharding.use_abstract_mesh(AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=dev)):
            low = jax.jit(f).trace(jax.ShapeDtypeStruct((b, c, r, 16), jnp.float32),
                                   jax.ShapeDtypeStruct((b, s, r, 16), kdt),
                                   jax.ShapeDtypeStruct((b, c), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.int32),
                                   jax.ShapeDtypeStruct((b, c // 128, s // 64), jnp.int32),
                                   jax.ShapeDtypeStruct((b, c, r), jnp.float32)).lower(lowering_platforms=("cuda",))
        assert "rtpurbo_prefill_tile_block_mass" in low.as_text()


@pytest.mark.parametrize("chunk", [8, 32])
def test_plan_packing_over_chunks_equals_one_chunk(chunk):
    """The packing kernel spread over chunks of blocks (each program placing its chunk by the union counts of
    the chunks before it) writes the same plan, padding slots included, as one chunk per group; mixed
    retrieval / local heads and heads that select nothing, ragged lengths, a dense row."""
    from pallas_kernels.indexer_topp.plan_triton import decode_plan_triton

    rng = np.random.default_rng(chunk)
    b, kh, g, sbp, kb = 3, 2, 4, 64, 16
    lse = jnp.asarray(rng.normal(size=(b, kh * g, sbp)) * 2, jnp.float32)
    isr = jnp.asarray([1, 0, 1, 0, 1, 1, 0, 0], jnp.int32)
    hs = jnp.asarray(rng.integers(0, 5, kh * g), jnp.int32)
    hw = jnp.asarray(rng.integers(20, 300, kh * g), jnp.int32).at[6:].set(-(1 << 30))  # heads 6, 7 select nothing
    kv_len = jnp.asarray([sbp * kb, 333, 17], jnp.int32)
    dense = jnp.asarray([0, 1, 0], jnp.int32)
    kw = dict(num_kv_heads=kh, top_p=0.8, kv_block=kb, sinks=4, keep_recent=16, interpret=True)
    one = decode_plan_triton(lse, isr, hs, hw, kv_len, dense, chunk=sbp, **kw)
    many = decode_plan_triton(lse, isr, hs, hw, kv_len, dense, chunk=chunk, **kw)
    for a, c in zip(one, many):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
    counts, blocks = np.asarray(one[1]), np.asarray(one[0])
    assert counts.min() > 0 and blocks.max() >= chunk  # union blocks lie in several chunks
    for bi in range(b):
        for ki in range(kh):
            c = counts[bi, ki]
            assert (np.diff(blocks[bi, ki, :c]) > 0).all()  # ascending union ids
            assert (blocks[bi, ki, c:] == (blocks[bi, ki, c - 1] if c else 0)).all()  # padding repeats the last


def test_sortfree_xla_topp_equals_the_sort_reference():
    """backend "xla": the bisection top-p selects the reference's stable-sort set — random masses (p kept away
    from every partial sum), many exact ties (masses from 3 integer weights), rows whose candidates cannot
    reach p, rows whose forced mass already does, rows with nothing visible, and p = 1."""
    from pallas_kernels.indexer_topp.xla import topp_select_sortfree

    rng = np.random.default_rng(3)
    rows, sb = 64, 40
    for weights in ("random", "ties"):
        w = rng.random((rows, sb)) ** 3 if weights == "random" else rng.integers(1, 4, (rows, sb)).astype(float)
        visible = rng.random((rows, sb)) < 0.8
        visible[5] = False
        forced = rng.random((rows, sb)) < 0.1
        forced[7] = visible[7]  # forced mass is everything
        w = np.where(visible, w, 0.0)
        mass = w / np.maximum(w.sum(-1, keepdims=True), 1e-30)
        # p away from every row's partial sums of the stable descending order (float rounding cannot flip a block)
        cums = []
        for r in range(rows):
            f = forced[r] & visible[r]
            cand = sorted(np.flatnonzero(visible[r] & ~f), key=lambda i: (-mass[r, i], i))
            cums.append(mass[r, f].sum() + np.concatenate([[0.0], np.cumsum(mass[r, cand])]))
        for p in rng.uniform(0.3, 0.97, 40):
            if min(np.abs(c - p).min() for c in cums) > 1e-4:
                break
        args = (jnp.asarray(mass, jnp.float32), jnp.asarray(visible), jnp.asarray(forced))
        for top_p in (float(p), 1.0):
            got = np.asarray(topp_select_sortfree(*args, top_p))
            want = np.asarray(topp_select(*args, top_p))
            np.testing.assert_array_equal(got, want)
        assert not got[5].any()
