"""Serving API: hybrid cache bytes, chunked prefill + decode equal to the full-sequence forward, generate."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from rtpurbo_jax.kv_cache import cache_bytes, cache_shardings, formula_bytes, init_cache
from rtpurbo_jax.lm import apply
from rtpurbo_jax.model_config import LLAMA3_8B, ModelConfig
from rtpurbo_jax.params import init_params, param_shardings
from rtpurbo_jax.indexer import init_indexer, share_key_maps, unshared_key_groups
from rtpurbo_jax.sampling import SamplingConfig, sample
from rtpurbo_jax.serving import decode_step, generate, prefill
from rtpurbo_jax.sparse_config import SparseConfig, roles_to_kv_granularity
from tests.conftest import assert_logits_close, greedy_full

# Two layers of different head splits (layer 0: one retrieval head on KV head 0; layer 1: both heads of KV
# group 1, group 0 local): the unrolled loop meets layers of different layouts
CFG = ModelConfig(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=8, num_kv_heads=2, head_dim=16, max_position_embeddings=512)
ROLES = np.zeros((2, 8), int)
ROLES[0, 1] = ROLES[1, 4] = ROLES[1, 5] = 1


@pytest.fixture(scope="module")
def model():
    params = init_params(CFG, jax.random.key(0), scale=0.2)
    return params, init_indexer(CFG, 4, jax.random.key(1))


# The kernel-backend tests run one layer (layer 1 above: KV group 1 full with both its heads retrieval, group 0
# local): interpret-mode kernels compile and run once per layer, and one layer has every kind of head
CFG1 = dataclasses.replace(CFG, num_layers=1)


@pytest.fixture(scope="module")
def model1():
    params = init_params(CFG1, jax.random.key(0), scale=0.2)
    return params, init_indexer(CFG1, 4, jax.random.key(1))


def sparse_cfg(**kw):
    base = dict(roles=ROLES.tolist(), sinks=3, window=20, kv_block=8, q_block=8, index_dim=4, top_p=0.7,
                seqlen_threshold=0, prefill_mode="indexer", keep_recent=8)
    return SparseConfig(**{**base, **kw})


def sparse_cfg1(**kw):
    return sparse_cfg(roles=ROLES[1:2].tolist(), **kw)


def tokens(b, t, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, (b, t)), jnp.int32)


def run_prefill_decode(params, ix, toks, prompt_len, sparse, max_len, chunk, cfg=CFG):
    """Logits [T - prompt_len + 1, B, V]: the prefill's last-token logits, then one per decode step."""
    b, t = toks.shape
    cache = init_cache(cfg, b, max_len, sparse, jnp.float32)
    lg, cache = prefill(params, cache, toks[:, :prompt_len], jnp.full((b,), prompt_len), ix, cfg=cfg,
                        sparse=sparse, chunk=chunk)
    out = [lg]
    for i in range(prompt_len, t):
        lg, cache = decode_step(params, cache, toks[:, i], ix, cfg=cfg, sparse=sparse, backend="reference")
        out.append(lg)
    assert (np.asarray(cache.lengths) == t).all()
    return np.stack(out)


@pytest.mark.parametrize("prompt_len,chunk,window,sinks", [(37, 8, 20, 3), (41, 16, 5, 4), (9, 32, 64, 0)])
def test_prefill_decode_match_forward_rtpurbo(model, prompt_len, chunk, window, sinks):
    """Per-token top-p (q_block=1) makes the full-sequence forward the exact reference for every position; small
    windows make the ring buffer wrap many times, chunks larger than the window included."""
    params, ix = model
    toks = tokens(1, 66, seed=prompt_len)
    sp = sparse_cfg(q_block=1, window=window, sinks=sinks)
    ref = np.asarray(apply(params, toks, CFG, mode="rtpurbo", sparse=sp, indexer=ix))
    got = run_prefill_decode(params, ix, toks, prompt_len, sp, max_len=70, chunk=chunk)
    assert_logits_close(got[:, 0], ref[0, prompt_len - 1:])
    # the sparse path really differs from dense attention here (the test could fail)
    dense = np.asarray(apply(params, toks, CFG))
    assert np.abs(dense[0, prompt_len - 1:] - ref[0, prompt_len - 1:]).max() > 1e-2


def test_prefill_decode_match_forward_full(model):
    params, _ = model
    toks = tokens(2, 50, seed=3)
    ref = np.asarray(apply(params, toks, CFG))
    got = run_prefill_decode(params, None, toks, 23, None, max_len=50, chunk=7)
    assert_logits_close(np.swapaxes(got, 0, 1), ref[:, 22:])


def test_prefill_tiles_match_forward_indexer_mode(model):
    """Prefill with q_block tiles (chunk a multiple of q_block) picks the forward's per-tile plans."""
    params, ix = model
    sp = sparse_cfg(q_block=8)
    for t in (24, 45):
        toks = tokens(1, t, seed=t)
        ref = np.asarray(apply(params, toks, CFG, mode="rtpurbo", sparse=sp, indexer=ix))
        cache = init_cache(CFG, 1, 48, sp, jnp.float32)
        lg, _ = prefill(params, cache, toks, jnp.asarray([t]), ix, cfg=CFG, sparse=sp, chunk=16)
        assert_logits_close(lg[0], ref[0, -1])


def test_two_turn_prefill_continues_positions(model):
    params, ix = model
    sp = sparse_cfg(q_block=1)
    toks = tokens(1, 40, seed=9)
    ref = np.asarray(apply(params, toks, CFG, mode="rtpurbo", sparse=sp, indexer=ix))
    cache = init_cache(CFG, 1, 40, sp, jnp.float32)
    _, cache = prefill(params, cache, toks[:, :17], jnp.asarray([17]), ix, cfg=CFG, sparse=sp, chunk=8)
    lg, cache = prefill(params, cache, toks[:, 17:], jnp.asarray([23]), ix, cfg=CFG, sparse=sp, chunk=8)
    assert_logits_close(lg[0], ref[0, -1])


def test_ragged_batch_equals_single_rows(model):
    params, ix = model
    sp = sparse_cfg(q_block=1)
    lens = [30, 17, 24]
    toks = tokens(3, 30, seed=5)
    cache = init_cache(CFG, 3, 40, sp, jnp.float32)
    lg, cache = prefill(params, cache, toks, jnp.asarray(lens), ix, cfg=CFG, sparse=sp, chunk=8)
    nxt = tokens(3, 4, seed=6)
    steps = [lg]
    for i in range(4):
        lg, cache = decode_step(params, cache, nxt[:, i], ix, cfg=CFG, sparse=sp)
        steps.append(lg)
    np.testing.assert_array_equal(np.asarray(cache.lengths), np.asarray(lens) + 4)
    for r, n in enumerate(lens):
        seq = jnp.concatenate([toks[r:r + 1, :n], nxt[r:r + 1]], axis=1)
        ref = np.asarray(apply(params, seq, CFG, mode="rtpurbo", sparse=sp, indexer=ix))
        assert_logits_close(np.stack([s[r] for s in steps]), ref[0, n - 1:])


def test_generate_equals_full_model_when_nothing_is_dropped(model):
    """top_p = 1 and window >= max_len: the RTPurbo generation is the dense model's, token for token."""
    params, ix = model
    prompt = tokens(1, 21, seed=11)
    sp = sparse_cfg(top_p=1.0, window=64, prefill_mode="dense")
    out = generate(params, prompt, [21], cfg=CFG, max_new_tokens=12, sparse=sp, indexer=ix, chunk=8)
    want = greedy_full(lambda p, t: apply(p, t, CFG), params, prompt, 12)
    np.testing.assert_array_equal(np.asarray(out["tokens"]), want)
    assert int(out["num_tokens"][0]) == 12


def test_generate_stop_tokens_and_padding(model):
    params, ix = model
    prompt = tokens(2, 15, seed=12)
    free = np.asarray(generate(params, prompt, [15, 9], cfg=CFG, max_new_tokens=8, sparse=sparse_cfg(),
                               indexer=ix)["tokens"])
    stop = int(free[0, 2])
    out = generate(params, prompt, [15, 9], cfg=CFG, max_new_tokens=8, sparse=sparse_cfg(), indexer=ix,
                   stop_tokens=(stop,))
    toks, count = np.asarray(out["tokens"]), np.asarray(out["num_tokens"])
    first = int(np.flatnonzero(free[0] == stop)[0])
    assert count[0] == first + 1
    np.testing.assert_array_equal(toks[0, :first + 1], free[0, :first + 1])
    assert (toks[0, first + 1:] == stop).all()


def test_generate_compiles_both_programs_once_and_sharded_inputs_follow_jit(model):
    """A first generate call compiles its two programs at once and keeps them (a second call of the same
    signature builds nothing, nor does one whose prompts fall in the same `prompt_bucket`: 17 and 20 columns are
    both padded to 24 with chunk 8); inputs sharded over a mesh take the jit path, unpadded, and give the same
    tokens (the padding changes nothing); the padding never widens the cache past max_position_embeddings when the
    call fits in it."""
    from rtpurbo_jax import serving

    params, ix = model
    prompt = tokens(2, 17, seed=13)
    kw = dict(cfg=CFG, max_new_tokens=5, sparse=sparse_cfg(), indexer=ix, chunk=8)
    serving._EXECUTABLES.clear()
    a = generate(params, prompt, [17, 11], **kw)
    assert len(serving._EXECUTABLES) == 1
    exe = next(iter(serving._EXECUTABLES.values()))
    assert exe.lower_s > 0 and exe.compile_s > 0
    b = generate(params, prompt, [17, 11], **kw)
    assert len(serving._EXECUTABLES) == 1 and next(iter(serving._EXECUTABLES.values())) is exe
    np.testing.assert_array_equal(np.asarray(b["tokens"]), np.asarray(a["tokens"]))
    assert a["cache"].layout.max_len == 24 + 5
    generate(params, tokens(2, 20, seed=14), [20, 3], **kw)
    assert len(serving._EXECUTABLES) == 1
    mesh = Mesh(np.asarray(jax.devices()[:2]).reshape(2, 1), ("data", "model"))
    sharded = jax.device_put(params, param_shardings(CFG, mesh))
    c = generate(sharded, prompt, [17, 11], **kw)
    assert len(serving._EXECUTABLES) == 1  # not the cached single-device programs
    np.testing.assert_array_equal(np.asarray(c["tokens"]), np.asarray(a["tokens"]))
    # the bucket stops at the model's positions: 17 + 5 fit in 25, so 20 columns (not 24) and a cache of 25
    d = generate(params, prompt, [17, 11], **{**kw, "cfg": dataclasses.replace(CFG, max_position_embeddings=25)})
    assert d["cache"].layout.max_len == 25
    np.testing.assert_array_equal(np.asarray(d["tokens"]), np.asarray(a["tokens"]))


def test_generate_with_data_parallel_prompts_runs_attention_per_shard(model, monkeypatch):
    """Prompts split over a mesh's "data" axis alone: generate splits its cache the same way and runs each
    layer's attention per shard (`shard_map`), with the single-device tokens."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from rtpurbo_jax import attention

    params, ix = model
    prompt = tokens(2, 17, seed=13)
    kw = dict(cfg=CFG, max_new_tokens=5, sparse=sparse_cfg(), indexer=ix, chunk=8)
    a = generate(params, prompt, [17, 11], **kw)
    mesh = Mesh(np.asarray(jax.devices()[:2]).reshape(2, 1), ("data", "model"))
    calls = []
    real = attention._cached_attention_per_shard
    monkeypatch.setattr(attention, "_cached_attention_per_shard", lambda *x: calls.append(1) or real(*x))
    c = generate(jax.device_put(params, NamedSharding(mesh, P())), jax.device_put(prompt, NamedSharding(mesh, P("data"))),
                 jnp.asarray([17, 11]), **kw)
    np.testing.assert_array_equal(np.asarray(c["tokens"]), np.asarray(a["tokens"]))
    assert len(calls) >= 2 * CFG.num_layers  # every layer of both programs traced per shard
    assert c["cache"].layers[0].k_full.sharding.spec[0] == "data"


def test_float8_index_keys_are_stored_saturated_and_counted(model):
    """SparseConfig.index_dtype="float8_e4m3fn": the cache holds index keys in float8 (bytes as the formula
    says), saturated at +-448 rather than NaN (the indexer here is scaled up so that many keys overflow), and
    serving runs on them (the kernels' float8 reads are pinned in tests/test_indexer_topp.py)."""
    params, ix = model
    sp = sparse_cfg(index_dtype="float8_e4m3fn")
    big = {k: v * 300.0 for k, v in ix.items()}
    cache = init_cache(CFG, 2, 40, sp, jnp.float32)
    assert all(lc.k_index.dtype == jnp.float8_e4m3fn for lc in cache.layers)
    assert cache_bytes(cache)["hybrid"] == formula_bytes(CFG, sp, 40, batch=2, bytes_per_elem=4)["rtpurbo"]
    toks = tokens(2, 30, seed=14)
    lg, cache = prefill(params, cache, toks[:, :28], jnp.asarray([28, 25]), big, cfg=CFG, sparse=sp, chunk=8)
    lg2, cache = decode_step(params, cache, toks[:, 28], big, cfg=CFG, sparse=sp)
    k_index = np.concatenate([np.asarray(lc.k_index, np.float32).reshape(-1) for lc in cache.layers])
    assert np.isfinite(k_index).all() and np.abs(k_index).max() == 448.0
    assert np.isfinite(np.asarray(lg)).all() and np.isfinite(np.asarray(lg2)).all()
    with pytest.raises(ValueError, match="index_dtype"):
        sparse_cfg(index_dtype="int8")


def test_shared_index_keys_store_one_key_per_group_and_serve_the_same(model):
    """SparseConfig.shared_index_keys: with an indexer whose key maps are shared per KV group, the cache stores one
    index key per (layer, full KV head) — 3 -> 1 and 2 -> 1 slots here, bytes as the formula says — and prefill +
    decode give the same logits as storing one per head; an indexer with different maps in a group is refused
    (scanned layers: tests/test_serving_scan.py)."""
    params, ix = model
    roles = np.zeros((2, 8), int)
    roles[0, [0, 1, 3]] = roles[1, [4, 5]] = 1  # layer 0: three heads of KV group 0; layer 1: two of group 1
    shared_ix = share_key_maps(ix, roles, CFG.num_kv_heads)
    assert unshared_key_groups(ix, roles, 2) == [(0, 0), (1, 1)] and not unshared_key_groups(shared_ix, roles, 2)
    per_head, shared = sparse_cfg(roles=roles.tolist()), sparse_cfg(roles=roles.tolist(), shared_index_keys=True)
    cache = init_cache(CFG, 2, 40, shared, jnp.float32)
    assert [lc.k_index.shape[2] for lc in cache.layers] == [1, 1]
    assert [lc.k_index.shape[2] for lc in init_cache(CFG, 2, 40, per_head, jnp.float32).layers] == [3, 2]
    assert cache_bytes(cache)["hybrid"] == formula_bytes(CFG, shared, 40, batch=2, bytes_per_elem=4)["rtpurbo"]
    toks = tokens(2, 36, seed=21)
    want = run_prefill_decode(params, shared_ix, toks, 30, per_head, max_len=40, chunk=8)
    got = run_prefill_decode(params, shared_ix, toks, 30, shared, max_len=40, chunk=8)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"key maps differ .*\(0, 0\)"):
        prefill(params, cache, toks[:, :30], jnp.full((2,), 30), ix, cfg=CFG, sparse=shared, chunk=8)


def test_shared_index_keys_decode_through_the_triton_selection_kernel(model1):
    """A decode step's selection on shared index keys through the grouped Triton scoring kernel (interpret mode)
    gives the logits of the reference path."""
    params, ix = model1
    roles = np.asarray(ROLES[1:2])
    shared_ix = share_key_maps(ix, roles, CFG1.num_kv_heads)
    sp = sparse_cfg1(q_block=1, window=9, sinks=2, shared_index_keys=True)
    toks = tokens(2, 34, seed=32)
    want = run_prefill_decode(params, shared_ix, toks, 30, sp, max_len=48, chunk=8, cfg=CFG1)
    cache = init_cache(CFG1, 2, 48, sp, jnp.float32)
    lg, cache = prefill(params, cache, toks[:, :30], jnp.asarray([30, 30]), shared_ix, cfg=CFG1, sparse=sp, chunk=8)
    got = [lg]
    for i in range(30, 34):
        lg, cache = decode_step(params, cache, toks[:, i], shared_ix, cfg=CFG1, sparse=sp, backend="triton",
                                interpret=True)
        got.append(lg)
    assert cache.layers[0].k_index.shape[2] == 1
    assert_logits_close(np.stack(got), want)


def test_sampling_rules():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 50)) * 3, jnp.float32)
    greedy = np.asarray(jnp.argmax(logits, -1))
    keys = jax.random.split(jax.random.key(0), 20)
    for cfg in (SamplingConfig(temperature=1.0, top_k=1), SamplingConfig(temperature=1.0, top_p=1e-6)):
        assert all((np.asarray(sample(logits, k, cfg)) == greedy).all() for k in keys)
    top3 = np.argsort(-np.asarray(logits), -1)[:, :3]
    draws = np.stack([np.asarray(sample(logits, k, SamplingConfig(temperature=2.0, top_k=3))) for k in keys])
    assert all(d in top3[r] for row in draws for r, d in enumerate(row))
    assert len(set(draws[:, 0].tolist())) > 1, "temperature sampling should not be deterministic"
    for bad in (dict(top_p=0.0), dict(top_p=1.5), dict(temperature=-1.0), dict(top_k=-2)):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)


def test_clear_errors(model):
    params, ix = model
    prompt = tokens(1, 10)
    with pytest.raises(ValueError, match="no indexer"):
        generate(params, prompt, [10], cfg=CFG, max_new_tokens=2, sparse=sparse_cfg())
    with pytest.raises(ValueError, match="expected"):
        generate(params, prompt, [10], cfg=CFG, max_new_tokens=2, sparse=sparse_cfg(),
                 indexer={"w_q": ix["w_q"][..., :2], "w_k": ix["w_k"]})
    with pytest.raises(ValueError, match="max_len"):
        generate(params, prompt, [10], cfg=CFG, max_new_tokens=5, max_len=12)
    with pytest.raises(ValueError, match="lengths"):
        generate(params, prompt, [11], cfg=CFG, max_new_tokens=2)
    with pytest.raises(ValueError, match="roles"):
        init_cache(CFG, 1, 8, SparseConfig(roles=[[0] * 8] * 3))  # 3 layers of roles, 2 in the model


def test_cache_bytes_match_formula_tiny():
    sp = sparse_cfg()
    for max_len in (2, 23, 100):
        got = cache_bytes(init_cache(CFG, 2, max_len, sp, jnp.bfloat16))
        want = formula_bytes(CFG, sp, max_len, batch=2)
        assert (got["hybrid"], got["dense"], got["kv"], got["index_keys"]) == \
            (want["rtpurbo"], want["dense"], want["kv"], want["index_keys"])
    assert cache_bytes(init_cache(CFG, 2, 100, None, jnp.bfloat16))["ratio"] == 1.0


@pytest.mark.parametrize("granularity", ["query", "kv"])
def test_cache_bytes_llama8b_1m(granularity):
    """Llama-3.1-8B shape at 1M tokens, 15% retrieval heads (abstract cache: no memory is allocated)."""
    cfg = LLAMA3_8B
    rng = np.random.default_rng(0)
    n_total = cfg.num_layers * cfg.num_heads
    roles = np.zeros(n_total, bool)
    if granularity == "query":
        roles[rng.choice(n_total, round(0.15 * n_total), replace=False)] = True
        roles = roles.reshape(cfg.num_layers, cfg.num_heads)
    else:
        groups = np.zeros(cfg.num_layers * cfg.num_kv_heads, bool)
        groups[rng.choice(groups.size, round(0.15 * groups.size), replace=False)] = True
        roles = np.repeat(groups.reshape(cfg.num_layers, cfg.num_kv_heads), cfg.num_heads // cfg.num_kv_heads, 1)
        np.testing.assert_array_equal(roles_to_kv_granularity(roles, cfg.num_kv_heads), roles)
    sp = SparseConfig(roles=roles.astype(int).tolist(), granularity=granularity)
    max_len = 1 << 20
    abstract = jax.eval_shape(lambda: init_cache(cfg, 1, max_len, sp, jnp.bfloat16))
    got = cache_bytes(abstract)
    want = formula_bytes(cfg, sp, max_len)
    assert got["hybrid"] == want["rtpurbo"] and got["dense"] == want["dense"]
    assert got["dense"] == 32 * 8 * max_len * 128 * 2 * 2  # 128 GiB
    print(f"\nLlama-3.1-8B @1M, 15% retrieval heads, {granularity} granularity: hybrid/dense = {got['ratio']:.3f} "
          f"({got['hybrid'] / 2**30:.1f} GiB of {got['dense'] / 2**30:.0f} GiB)")
    assert got["ratio"] < (0.7 if granularity == "query" else 0.2)
    shared = dataclasses.replace(sp, shared_index_keys=True)  # one index key per full KV head
    got_s = cache_bytes(jax.eval_shape(lambda: init_cache(cfg, 1, max_len, shared, jnp.bfloat16)))
    assert got_s["hybrid"] == formula_bytes(cfg, shared, max_len)["rtpurbo"] and got_s["kv"] == got["kv"]
    if granularity == "kv":  # every retrieval group has all 4 query heads: 4x fewer index-key bytes
        assert got_s["index_keys"] * 4 == got["index_keys"]


def test_sharded_decode_equals_single_device(model):
    """Params and cache on a (data 2, model 2) mesh: same logits as one device; the cache stays sharded."""
    params, ix = model
    sp = sparse_cfg(q_block=1)
    toks = tokens(2, 30, seed=21)
    want = run_prefill_decode(params, ix, toks, 25, sp, max_len=32, chunk=8)
    mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
    sparams = jax.device_put(params, param_shardings(CFG, mesh))
    cache = init_cache(CFG, 2, 32, sp, jnp.float32)
    cache = jax.device_put(cache, cache_shardings(cache, mesh))
    lg, cache = prefill(sparams, cache, toks[:, :25], jnp.asarray([25, 25]), ix, cfg=CFG, sparse=sp, chunk=8)
    got = [lg]
    for i in range(25, 30):
        lg, cache = decode_step(sparams, cache, toks[:, i], ix, cfg=CFG, sparse=sp)
        got.append(lg)
    assert_logits_close(np.stack(got), want)
    layer = cache.layers[1]  # one full and one local KV head: neither divides 2 -> replicated; batch split
    assert layer.k_full.sharding.spec[0] == "data"
    assert cache.layers[0].k_full.shape[2] == 1


def test_data_parallel_cache_runs_attention_per_shard(model1):
    """A cache split over "data" only (a (4, 1) mesh): prefill and decode_step run each layer's attention per
    shard (`shard_map`; the Triton kernels in interpret mode here) and give the single-device logits; the cache
    stays split. A cache whose heads are also split (a (2, 2) mesh) or a single-device one is left to XLA."""
    from rtpurbo_jax.serving import _decode_jit, data_parallel_mesh

    params, ix = model1
    sp = sparse_cfg1(q_block=8, window=9, sinks=2)
    toks = tokens(4, 36, seed=23)
    want = run_prefill_decode(params, ix, toks, 32, sp, max_len=48, chunk=16, cfg=CFG1)
    mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(4, 1), ("data", "model"))
    cache = init_cache(CFG1, 4, 48, sp, jnp.float32)
    assert data_parallel_mesh(cache) is None
    cache = jax.device_put(cache, cache_shardings(cache, mesh))
    assert data_parallel_mesh(cache) is mesh
    lg, cache = prefill(params, cache, toks[:, :32], jnp.full((4,), 32), ix, cfg=CFG1, sparse=sp, chunk=16,
                        backend="triton", interpret=True)
    got = [lg]
    for i in range(32, 36):
        lg, cache = decode_step(params, cache, toks[:, i], ix, cfg=CFG1, sparse=sp, backend="triton",
                                interpret=True)
        got.append(lg)
    assert_logits_close(np.stack(got), want)
    assert cache.layers[0].k_full.sharding.spec[0] == "data"
    jaxpr = jax.make_jaxpr(lambda c: _decode_jit(params, c, toks[:, 0], ix, cfg=CFG1, sparse=sp,
                                                 backend=("triton", "triton"), interpret=True, stats=False,
                                                 mesh=mesh))(cache)
    assert "shard_map" in str(jaxpr)
    two = Mesh(np.asarray(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
    c2 = init_cache(CFG1, 4, 48, sp, jnp.float32)
    assert data_parallel_mesh(jax.device_put(c2, cache_shardings(c2, two))) is None  # heads split too


def test_sharded_dense_cache_keeps_heads_on_model_axis(model):
    params, _ = model
    toks = tokens(2, 20, seed=22)
    mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
    cache = init_cache(CFG, 2, 24, None, jnp.float32)
    cache = jax.device_put(cache, cache_shardings(cache, mesh))
    assert tuple(cache.layers[0].k_full.sharding.spec) == ("data", None, "model", None)
    lg, cache = prefill(jax.device_put(params, param_shardings(CFG, mesh)), cache, toks, jnp.asarray([20, 20]),
                        cfg=CFG, chunk=8)
    assert_logits_close(lg, np.asarray(apply(params, toks, CFG))[:, -1])
    assert cache.layers[0].k_full.sharding.is_equivalent_to(
        cache_shardings(cache, mesh).layers[0].k_full, 4)


@pytest.mark.parametrize("backend", ["triton", "mosaic_tpu"])
def test_decode_with_kernel_backends_matches_reference(model1, backend):
    """decode_step's full-KV-head attention through the sparse decode kernels (interpret mode) = the jnp path,
    in RTPurbo mode (top-p retrieval heads, banded local heads sharing their group) and with a dense cache."""
    params, ix = model1
    toks = tokens(2, 35, seed=31)
    for sp in (sparse_cfg1(q_block=1, window=9, sinks=2), None):
        want = run_prefill_decode(params, ix if sp else None, toks, 30, sp, max_len=48, chunk=8, cfg=CFG1)
        cache = init_cache(CFG1, 2, 48, sp, jnp.float32)
        lg, cache = prefill(params, cache, toks[:, :30], jnp.asarray([30, 30]), ix if sp else None, cfg=CFG1,
                            sparse=sp, chunk=8)
        got = [lg]
        for i in range(30, 35):
            lg, cache = decode_step(params, cache, toks[:, i], ix if sp else None, cfg=CFG1, sparse=sp,
                                    backend=backend, interpret=True)
            got.append(lg)
        assert_logits_close(np.stack(got), want)


@pytest.mark.parametrize("backend", ["triton", "mosaic_tpu"])
def test_prefill_chunks_with_kernel_backends_match_reference(model1, backend):
    """Chunked prefill whose full-KV-head attention runs the block-sparse prefill kernel (interpret mode), with
    traced per-sequence query starts (a second turn appended to a ragged batch), = the jnp path; indexer plans
    per q_block tile, dense retrieval, and a dense cache."""
    params, ix = model1
    toks = tokens(2, 70, seed=41)
    configs = (sparse_cfg1(window=12, sinks=2), sparse_cfg1(prefill_mode="dense", window=12), None)
    # Mosaic TPU interpret is slow (one simulated program per tile): indexer plans only, 16-row tiles over 16-key
    # blocks, the second turn one chunk of 32 rows
    chunk = 16 if backend == "triton" else 32
    if backend == "mosaic_tpu":
        configs = (sparse_cfg1(window=12, sinks=2, q_block=16, kv_block=16),)
    for sp in configs if backend == "triton" else configs[:1]:
        # the first turn (rows from 0, ragged) fills the cache on the jnp path; the second turn (starts 40 / 29,
        # mid-cache, ragged) runs on each backend from that same cache
        cache = init_cache(CFG1, 2, 80, sp, jnp.float32)
        _, cache = prefill(params, cache, toks[:, :40], jnp.asarray([40, 29]), ix if sp else None, cfg=CFG1,
                           sparse=sp, chunk=chunk, backend="reference")
        # (prefill donates its cache: each backend gets a copy)
        outs = {be: prefill(params, jax.tree.map(jnp.copy, cache), toks[:, 40:], jnp.asarray([30, 17]),
                            ix if sp else None, cfg=CFG1, sparse=sp, chunk=chunk, backend=be, interpret=True)[0]
                for be in ("reference", backend)}
        assert_logits_close(outs[backend], outs["reference"])


@pytest.mark.parametrize("starts,window,sinks_now,layout_sinks", [
    ((0, 0), 20, 3, 3), ((2, 45), 20, 3, 3), ((30, 77), 20, 3, 3), ((5, 61), 9, 3, 3), ((40, 13), 1 << 30, 0, 3),
    ((0, 33), 20, 0, 0)])
def test_local_heads_prefill_through_the_op_equals_the_masked_path(starts, window, sinks_now, layout_sinks):
    """A prefill chunk's local KV heads through the block-sparse op (unrolled ring + band plan + sinks merged by
    log-sum-exp) = the masked jnp attention over sinks + ring + chunk: starts inside the sinks, before and
    after the ring wraps, ragged rows, a narrower band, a dense call (no sinks, unbounded window), a cache
    without sink slots."""
    from rtpurbo_jax.attention import AttentionCall, Positions, _local_kv_attention, _local_kv_attention_op
    from rtpurbo_jax.kv_cache import CacheLayout

    sp = sparse_cfg(window=20, sinks=layout_sinks)
    layout = CacheLayout.build(CFG, sp, 128)
    ll = layout.layers[1]
    b, c, nl, kl = 2, 16, len(ll.q_heads(ll.local_kv)), len(ll.local_kv)
    rng = np.random.default_rng(sum(starts) + window)
    lc = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), jnp.float32),
                      init_cache(CFG, b, 128, sp, jnp.float32).layers[1])
    start = jnp.asarray(starts, jnp.int32)
    n_valid = jnp.asarray([c, c - 5], jnp.int32)
    q_pos = start[:, None] + jnp.arange(c, dtype=jnp.int32)[None]
    valid = jnp.arange(c)[None] < n_valid[:, None]
    pos = Positions(q_pos, valid, start, start + n_valid)
    q, k, v = (jnp.asarray(rng.standard_normal((b, c, n, CFG.head_dim)), jnp.float32) for n in (nl, kl, kl))
    band = (jnp.int32(sinks_now), jnp.int32(window))
    want, want_cache = _local_kv_attention(q, k, v, lc, layout, pos, *band)
    call = AttentionCall(prefill_backend="reference")
    got, got_cache = _local_kv_attention_op(q, k, v, lc, layout, pos, *band, sp.kv_block, call)
    ok = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(got)[ok], np.asarray(want)[ok], rtol=2e-5, atol=2e-5)
    for g, w in zip(got_cache, want_cache):  # the same cache writes
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
