"""Serving with layers scanned over a stacked cache (`init_cache(..., scan=True)`) equals the unrolled layers."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtpurbo_jax.indexer import init_indexer, share_key_maps
from rtpurbo_jax.kv_cache import CacheLayout, LayerLayout, cache_bytes, init_cache
from rtpurbo_jax.params import init_params
from rtpurbo_jax.serving import decode_step, generate, prefill
from rtpurbo_jax.sparse_config import SparseConfig
from tests.test_serving import CFG

CFG4 = dataclasses.replace(CFG, num_layers=4)
ROLES = np.zeros((4, 8), int)
ROLES[0, 1] = 1  # split (1 full, 1 local, (1,)) on KV head 0
ROLES[1, 6] = 1  # the same split on KV head 1: one buffer with layer 0, heads permuted differently
ROLES[2, [0, 2, 5]] = 1  # (2, 0, (2, 1))
# layer 3: no retrieval head (0, 2, ())


@pytest.fixture(scope="module")
def model():
    return init_params(CFG4, jax.random.key(0), scale=0.2), init_indexer(CFG4, 4, jax.random.key(1))


def sparse_cfg(**kw):
    base = dict(roles=ROLES.tolist(), sinks=3, window=12, kv_block=8, q_block=8, index_dim=4, top_p=0.7,
                seqlen_threshold=0, prefill_mode="indexer", keep_recent=8)
    return SparseConfig(**{**base, **kw})


def test_canonical_layouts():
    lay = CacheLayout.build(CFG4, sparse_cfg(), 64, scan=True)
    assert lay.groups == ((0, 1), (2,), (3,))
    assert lay.layers[0].canonical() == lay.layers[1].canonical() != lay.layers[2].canonical()
    ll = LayerLayout.from_roles(ROLES[2].astype(bool), 2)
    assert ll.full_kv == (0, 1) and ll.retrieval_q == (0, 2, 5)
    q_perm, kv_perm = ll.perms()
    assert q_perm.tolist() == [0, 2, 1, 3, 5, 4, 6, 7]  # retrieval heads first within each KV head
    # every retrieval head sits where the canonical layout puts retrieval heads
    assert set(q_perm[list(ll.canonical().retrieval_q)].tolist()) == {0, 2, 5}
    assert kv_perm.tolist() == [0, 1]
    # a KV head with more retrieval heads comes first
    ll = LayerLayout.from_roles(np.isin(np.arange(8), [1, 4, 6]), 2)
    assert ll.full_kv == (1, 0) and ll.retrieval_q == (4, 6, 1) and ll.split == (2, 0, (2, 1))


def _serve(params, ix, sp, scan, toks, lens, chunk):
    """Prefill toks[:, :33] (row lengths `lens`) into a cache made with `scan`, then decode toks[:, 33:40]: the
    logits of every call, each step's blocks_frac and the final cache."""
    cache = init_cache(CFG4, 2, 48, sp, jnp.float32, scan=scan)
    lg, cache = prefill(params, cache, toks[:, :33], lens, ix, cfg=CFG4, sparse=sp, chunk=chunk)
    out, fr = [lg], []
    for i in range(33, 40):
        lg, cache, st = decode_step(params, cache, toks[:, i], ix, cfg=CFG4, sparse=sp, stats=True)
        out.append(lg)
        fr.append(st["blocks_frac"])
    return np.stack(out), np.stack(fr), cache


@pytest.mark.parametrize("mode,chunk", [("indexer", 8), ("dense", 16)])
def test_scanned_layers_match_unrolled(model, mode, chunk):
    params, ix = model
    sp = sparse_cfg(prefill_mode=mode)
    toks = jnp.asarray(np.random.default_rng(0).integers(0, CFG4.vocab_size, (2, 40)), jnp.int32)
    lens = jnp.asarray([29, 33])
    (a, fa, ca), (b, fb, cb) = (_serve(params, ix, sp, scan, toks, lens, chunk) for scan in (False, True))
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fb, fa, rtol=1e-6)
    assert cache_bytes(cb) == cache_bytes(ca)
    assert len(cb.layers) == 3 and cb.layers[0].k_full.shape[0] == 2
    for i in range(4):  # the same buffers, layer by layer
        jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-5),
                     ca.layer(i), cb.layer(i))


@pytest.mark.parametrize("scan,slots", [("split", [1, 2, 0]), ("padded", [1, 2, 0]), ("uniform", [2])])
def test_scans_serve_shared_index_keys_like_the_unrolled_layers(model, scan, slots):
    """shared_index_keys with layers scanned: one index key per full KV head in each stack (layer 2's group: 2 slots
    for its 3 retrieval heads; padded groups add no phantom keys; the uniform stack has 2 full KV heads in every
    layer, a promoted one's key unused), the logits and blocks_frac of the unrolled layers, and every layer's
    buffers equal (uniform: its real index keys; its K / V sit in the promoted layout)."""
    params, ix = model
    roles = ROLES_P if scan == "padded" else ROLES
    sp = sparse_cfg(roles=roles.tolist(), shared_index_keys=True)
    shared_ix = share_key_maps(ix, roles, CFG4.num_kv_heads)
    toks = jnp.asarray(np.random.default_rng(2).integers(0, CFG4.vocab_size, (2, 40)), jnp.int32)
    lens = jnp.asarray([33, 30])
    (a, fa, ca), (b, fb, cb) = (_serve(params, shared_ix, sp, s, toks, lens, 8) for s in (False, scan))
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fb, fa, rtol=1e-6)
    assert [lc.k_index.shape[-2] for lc in cb.layers] == slots
    if scan == "uniform":
        for i in range(4):
            np.testing.assert_allclose(np.asarray(cb.layer(i).k_index), np.asarray(ca.layer(i).k_index), rtol=1e-5,
                                       atol=1e-5)
        return
    assert cache_bytes(cb) == cache_bytes(ca)
    for i in range(4):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-5),
                     ca.layer(i), cb.layer(i))


def test_generate_scan_layers(model):
    """generate with layers scanned (padded retrieval slots: the scan mode whose layout differs most from the
    unrolled one; split scans are pinned against unrolled prefill / decode above) gives the unrolled tokens."""
    params, ix = model
    sp = sparse_cfg()
    prompts = jnp.asarray(np.random.default_rng(1).integers(0, CFG4.vocab_size, (2, 24)), jnp.int32)
    kw = dict(cfg=CFG4, max_new_tokens=6, sparse=sp, indexer=ix, chunk=8, max_len=32)
    a = generate(params, prompts, jnp.asarray([24, 17]), **kw)
    assert not a["cache"].layout.scan
    c = generate(params, prompts, jnp.asarray([24, 17]), scan_layers="padded", **kw)
    np.testing.assert_array_equal(np.asarray(c["tokens"]), np.asarray(a["tokens"]))
    assert c["cache"].layout.scan == "padded" and c["cache"].layers[0].k_index.shape[3] == CFG4.num_heads // CFG4.num_kv_heads
    u = generate(params, prompts, jnp.asarray([24, 17]), scan_layers="uniform", **kw)
    np.testing.assert_array_equal(np.asarray(u["tokens"]), np.asarray(a["tokens"]))
    assert len(u["cache"].layers) == 1
    with pytest.raises(ValueError, match="scan_layers must be one of"):
        generate(params, prompts, jnp.asarray([24, 17]), scan_layers="yes", **kw)


@pytest.mark.parametrize("scan", [False, "split", "padded", "uniform"])
@pytest.mark.parametrize("dense", [False, True])
def test_decode_loop_compiles_for_the_prefill_outputs(model, scan, dense):
    """compile_generate lowers the decode loop before tracing the prefill, from `_prefill_outputs`: those shapes
    must be what the traced prefill returns (tree, shapes, dtypes) for every cache kind."""
    from rtpurbo_jax import serving

    params, ix = model
    sp = None if dense else sparse_cfg()
    prompts = jnp.asarray(np.random.default_rng(2).integers(0, CFG4.vocab_size, (2, 24)), jnp.int32)
    static = dict(cfg=CFG4, sparse=sp, sampling=serving.SamplingConfig(), stop_tokens=(), chunk=8, max_len=32,
                  cache_dtype="float32", backend=(None, None), interpret=False, scan_layers=scan)
    args = (params, prompts, jnp.asarray([24, 17]), None if dense else ix, jax.random.key(0))
    traced = jax.eval_shape(lambda *a: serving._generate_prefill(*a, **static), *args)
    predicted = serving._prefill_outputs(prompts, args[-1], static)
    assert serving._same_shapes(traced, predicted)
    assert not serving._same_shapes(traced, predicted[:3] + (init_cache(CFG4, 2, 40, sp, "float32", scan=scan),))


def test_generate_relowers_the_decode_loop_if_the_predicted_shapes_are_wrong(model, monkeypatch, caplog):
    """Should `_prefill_outputs` ever disagree with the traced prefill, compile_generate warns and lowers the decode
    loop again from the prefill's outputs: the tokens are those of the normal path."""
    from rtpurbo_jax import serving

    params, ix = model
    prompts = jnp.asarray(np.random.default_rng(3).integers(0, CFG4.vocab_size, (2, 24)), jnp.int32)
    kw = dict(cfg=CFG4, max_new_tokens=4, sparse=sparse_cfg(), indexer=ix, chunk=8, max_len=32)
    serving._EXECUTABLES.clear()
    want = generate(params, prompts, jnp.asarray([24, 17]), **kw)["tokens"]
    real = serving._prefill_outputs
    wrong = lambda prompts, key, static: real(prompts, key, {**static, "max_len": static["max_len"] + 8})
    monkeypatch.setattr(serving, "_prefill_outputs", wrong)
    serving._EXECUTABLES.clear()
    with caplog.at_level("WARNING", logger="rtpurbo_jax.serving"):
        got = generate(params, prompts, jnp.asarray([24, 17]), **kw)["tokens"]
    assert "lowering it again" in caplog.text
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    serving._EXECUTABLES.clear()


def test_scanned_dense_cache_sharded(model):
    """A dense stacked cache (one split): heads on the model axis behind the layers' axis, same logits."""
    from jax.sharding import Mesh

    from rtpurbo_jax.kv_cache import cache_shardings
    from rtpurbo_jax.params import param_shardings

    params, _ = model
    toks = jnp.asarray(np.random.default_rng(2).integers(0, CFG4.vocab_size, (2, 20)), jnp.int32)
    mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
    out = {}
    for scan in (False, True):
        cache = init_cache(CFG4, 2, 24, None, jnp.float32, scan=scan)
        cache = jax.device_put(cache, cache_shardings(cache, mesh))
        out[scan], cache = prefill(jax.device_put(params, param_shardings(CFG4, mesh)), cache, toks,
                                   jnp.asarray([20, 17]), cfg=CFG4, chunk=8)
    assert len(cache.layers) == 1 and cache.layers[0].k_full.shape[:2] == (4, 2)
    want = cache_shardings(cache, mesh).layers[0].k_full
    assert tuple(want.spec) == (None, "data", None, "model", None)
    assert cache.layers[0].k_full.sharding.is_equivalent_to(want, 5)  # prefill kept the cache where it was
    np.testing.assert_allclose(np.asarray(out[True]), np.asarray(out[False]), rtol=1e-5, atol=1e-5)


def test_scanned_data_parallel_cache_runs_attention_per_shard(model):
    """A stacked (padded) cache split over "data" only: each scanned layer's attention runs per shard (the Triton
    kernels in interpret mode; a shard_map in the decode program) and the logits equal the single-device unrolled
    layers'."""
    from jax.sharding import Mesh

    from rtpurbo_jax.kv_cache import cache_shardings
    from rtpurbo_jax.serving import _decode_jit, data_parallel_mesh

    scan = "padded"
    params, ix = model
    sp = sparse_cfg(q_block=8)
    toks = jnp.asarray(np.random.default_rng(5).integers(0, CFG4.vocab_size, (4, 36)), jnp.int32)
    mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(4, 1), ("data", "model"))
    out = {}
    for placed in (False, True):
        cache = init_cache(CFG4, 4, 48, sp, jnp.float32, scan=scan if placed else False)
        if placed:
            cache = jax.device_put(cache, cache_shardings(cache, mesh))
            assert data_parallel_mesh(cache) is mesh
        kw = dict(backend="triton", interpret=True) if placed else {}
        lg, cache = prefill(params, cache, toks[:, :32], jnp.full((4,), 32), ix, cfg=CFG4, sparse=sp, chunk=16, **kw)
        got = [lg]
        for i in range(32, 34):
            lg, cache = decode_step(params, cache, toks[:, i], ix, cfg=CFG4, sparse=sp, **kw)
            got.append(lg)
        out[placed] = np.stack(got)
    assert cache.layers[0].k_full.sharding.spec[1] == "data"
    np.testing.assert_allclose(out[True], out[False], rtol=1e-4, atol=1e-4)
    jaxpr = jax.make_jaxpr(lambda c: _decode_jit(params, c, toks[:, 0], ix, cfg=CFG4, sparse=sp,
                                                 backend=("triton", "triton"), interpret=True, stats=False,
                                                 mesh=mesh))(cache)
    assert "shard_map" in str(jaxpr)


# padded grouping: layers 0 and 1 have different splits ((1, 1, (1,)) and (1, 1, (2,))) but one KV count pair
ROLES_P = np.zeros((4, 8), int)
ROLES_P[0, 1] = 1
ROLES_P[1, [4, 6]] = 1
ROLES_P[2, [0, 2, 5]] = 1  # (2, 0, (2, 1)): slots for all 8 heads, 3 active
PHANTOM = 3 + 2 + 5  # index-key slots that hold a local head


def test_padded_layouts():
    sp = sparse_cfg(roles=ROLES_P.tolist())
    assert CacheLayout.build(CFG4, sp, 64, scan=True).groups == ((0,), (1,), (2,), (3,))
    lay = CacheLayout.build(CFG4, sp, 64, scan="padded")
    assert lay.groups == ((0, 1), (2,), (3,))
    assert lay.stacked(0) == lay.stacked(1) and lay.stacked(0).retrieval_q == (0, 1, 2, 3)
    assert lay.layers[1].active().tolist() == [True, True, False, False]
    assert lay.layers[2].active().tolist() == [True, True, False, False, True, False, False, False]
    assert lay.stacked(3).retrieval_q == () and lay.layers[3].active().shape == (0,)
    # uniform: one group; every layer keeps 2 KV heads whole (layer 0's local KV head 1, layer 3's both promoted)
    uni = CacheLayout.build(CFG4, sp, 64, scan="uniform")
    assert uni.groups == ((0, 1, 2, 3),) and uni.padded
    assert [ll.full_kv for ll in uni.layers] == [(0, 1), (1, 0), (0, 1), (0, 1)]
    assert uni.layers[0].active().tolist() == [True, False, False, False, False, False, False, False]
    assert uni.layers[3].active().tolist() == [] and uni.stacked(3).retrieval_q == tuple(range(8))
    assert CacheLayout.build(CFG4, None, 64, scan="uniform").groups == ((0, 1, 2, 3),)  # dense: one stack anyway
    with pytest.raises(ValueError, match="scan must be one of"):
        CacheLayout.build(CFG4, sp, 64, scan="layers")


@pytest.mark.parametrize("scan", ["padded", "uniform"])
def test_padded_scan_matches_unrolled(model, scan):
    """scan="padded": a slot whose head is local plans as that local head (two layers of one group with different
    active slots; indexer prefill — dense prefill's role merge is pinned in tests/test_planner.py); logits,
    blocks_frac and every layer's buffers (the real slots) equal the unrolled layers'; the bytes grow by the
    phantom index keys. scan="uniform" (one stack; promoted KV heads, all their query heads local, and a layer
    with no retrieval head, which must not count in blocks_frac): the same logits and blocks_frac."""
    params, ix = model
    sp, chunk = sparse_cfg(roles=ROLES_P.tolist(), prefill_mode="indexer"), 8
    toks = jnp.asarray(np.random.default_rng(4).integers(0, CFG4.vocab_size, (2, 40)), jnp.int32)
    lens = jnp.asarray([31, 33])
    (a, fa, ca), (b, fb, cb) = (_serve(params, ix, sp, s, toks, lens, chunk) for s in (False, scan))
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fb, fa, rtol=1e-6)
    if scan == "uniform":  # 2 full KV heads x 8 index-key slots in every layer
        assert len(cb.layers) == 1 and cb.layers[0].k_full.shape[3] == 2 and cb.layers[0].k_ring.shape[3] == 0
        assert cache_bytes(cb)["index_keys"] == 4 * 8 * 2 * 48 * 4 * 4
        for i in range(4):  # each layer's real index keys (the promoted layout's K / V differ in shape)
            np.testing.assert_allclose(np.asarray(cb.layer(i).k_index), np.asarray(ca.layer(i).k_index), rtol=1e-5,
                                       atol=1e-5)
        return
    assert len(cb.layers) == 3
    assert cache_bytes(cb)["index_keys"] == cache_bytes(ca)["index_keys"] + PHANTOM * 2 * 48 * 4 * 4
    assert cache_bytes(cb)["kv"] == cache_bytes(ca)["kv"]
    for i in range(4):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-5),
                     ca.layer(i), cb.layer(i))


def test_scanned_decode_reads_the_stacked_cache_in_place(model):
    """A scanned decode step on the GPU kernels (Triton, interpret mode) reads each layer of the stacked full-KV
    and index buffers in place: its program slices none of them (a slice of a kernel's operand is a copy of the
    layer's whole cache per step), and its logits, blocks_frac and cache equal the unrolled layers' on the same
    kernels."""
    params, ix = model
    sp = sparse_cfg()
    toks = jnp.asarray(np.random.default_rng(2).integers(0, CFG4.vocab_size, (2, 36)), jnp.int32)
    kw = dict(cfg=CFG4, sparse=sp, backend="triton", interpret=True)
    outs = []
    for scan in (False, "padded"):
        cache = init_cache(CFG4, 2, 48, sp, jnp.float32, scan=scan)
        _, cache = prefill(params, cache, toks[:, :33], jnp.asarray([29, 33]), ix, cfg=CFG4, sparse=sp, chunk=8)
        steps = []
        for i in range(33, 36):
            lg, cache, st = decode_step(params, cache, toks[:, i], ix, stats=True, **kw)
            steps.append((np.asarray(lg), np.asarray(st["blocks_frac"])))
        outs.append((steps, cache))
    for (la, fa), (lb, fb) in zip(outs[0][0], outs[1][0]):
        np.testing.assert_allclose(lb, la, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(fb, fa, rtol=1e-6)
    for i in range(4):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-5),
                     outs[0][1].layer(i), outs[1][1].layer(i))
    cache = outs[1][1]
    jaxpr = str(jax.make_jaxpr(lambda c, t: decode_step(params, c, t, ix, check=False, **kw))(cache, toks[:, 35]))
    full_len = [ln for ln in jaxpr.splitlines()
                if ("dynamic_slice" in ln or "gather" in ln) and ",48," in ln.split("=")[0]]
    assert not full_len, f"the scanned decode copies slices of the stacked cache: {full_len[:3]}"
