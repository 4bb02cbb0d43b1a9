"""The fidelity instrument and the stage-1 changes it motivated: RULER-style task generators and scorer, the
accuracy suite end to end through serving, the oracle selector, block-level / long-range-weighted KL, the
local prior, and retrieval events in the training windows."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import accuracy
from benchmarks.output import write_json
from rtpurbo_jax.evals.tasks import TASKS, Builder, make_prompt, max_new_tokens, score
from train.objective import _row_kl, kl_loss


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer):
    return smollm2_tokenizer


def test_scorer_can_fail():
    assert score("The number is 1234567.", ("1234567",)) == 100.0
    assert score("The number is 7654321.", ("1234567",)) == 0.0
    assert score("alpha and Beta", ("alpha", "beta", "gamma", "delta")) == 50.0
    with pytest.raises(ValueError, match="at least one answer"):
        score("x", ())


@pytest.mark.parametrize("task", sorted(TASKS))
def test_tasks_exact_length_deterministic_answers_inside(tok, task):
    b = Builder(tok)
    p = make_prompt(tok, task, 700, 3, seed=5, builder=b)
    assert p.tokens.shape == (700,) and p.tokens.dtype == np.int32
    again = make_prompt(tok, task, 700, 3, seed=5, builder=b)
    other = make_prompt(tok, task, 700, 4, seed=5, builder=b)
    assert np.array_equal(p.tokens, again.tokens) and p.answers == again.answers
    assert not np.array_equal(p.tokens, other.tokens)
    text = tok.decode(p.tokens)
    if task != "frequent_words":  # (the answer of frequent_words is counted from the list itself)
        assert all(a.lower() in text.lower() for a in p.answers), (task, p.answers)
    assert max_new_tokens(task) >= 8


def _needle_at(tok, p) -> int:
    ans = tok(" " + p.answers[0], add_special_tokens=False)["input_ids"]
    t = p.tokens.tolist()
    return next(j for j in range(len(t)) if t[j:j + len(ans)] == ans)


def test_needle_depth_places_the_needle_and_defaults_stay(tok):
    """depth=(lo, hi) puts the needle in that part of the haystack (the distill check puts it farther from the
    question than the local window); the default is RULER's spread and leaves earlier prompts unchanged."""
    b = Builder(tok)
    length = 1200
    early = [_needle_at(tok, make_prompt(tok, "niah_single_prose", length, i, 3, b, (0.0, 0.05))) for i in range(4)]
    late = [_needle_at(tok, make_prompt(tok, "niah_single_prose", length, i, 3, b, (0.9, 0.95))) for i in range(4)]
    assert max(early) < 0.15 * length < 0.8 * length < min(late), (early, late)
    for i in range(3):
        assert np.array_equal(make_prompt(tok, "niah_single_prose", length, i, 3, b).tokens,
                              make_prompt(tok, "niah_single_prose", length, i, 3, b, (0.05, 0.95)).tokens)
    with pytest.raises(ValueError, match="depth must be"):
        make_prompt(tok, "niah_single_prose", length, 0, 3, b, (0.5, 0.2))
    with pytest.raises(ValueError, match="only the niah"):
        make_prompt(tok, "common_words", length, 0, 3, b, (0.0, 0.1))


@pytest.mark.parametrize("length", [2048, 4096, 8000])
def test_word_list_tasks_fill_long_prompts(tok, length):
    """The word lists of common / frequent words fill any length exactly (they once fell short at 4K+)."""
    b = Builder(tok)
    for task in ("common_words", "frequent_words"):
        p = make_prompt(tok, task, length, 0, builder=b)
        assert len(p.tokens) == length
        text = tok.decode(p.tokens)
        assert all(a in text for a in p.answers)


def _fake_run_batch(right: bool, prompts_by_tokens, tok):
    """A stand-in model: emits every answer of the prompt (right) or a fixed wrong string."""

    def run(params, cfg, mode, indexer, tokens, lengths, max_len, steps, forced=None, cache=None):
        outs = []
        for row in tokens:
            ans = prompts_by_tokens.get(row.tobytes(), ("zzz",))
            ids = tok.encode(" " + ", ".join(ans) if right else " nothing here", add_special_tokens=False)
            outs.append((ids + [tok.eos_token_id] * steps)[:steps])
        nll = np.full(len(tokens), 2.0 * steps)
        return np.asarray(outs), nll, 0.5, cache

    return run


@pytest.mark.parametrize("right", [True, False])
def test_suite_scores_right_model_100_wrong_model_0(tok, monkeypatch, right):
    """evaluate() with a model right by construction scores 100 on every task, a wrong one 0 (the scorer path,
    prompts, answer bookkeeping and ppl arithmetic, without the cost of a real model)."""
    tasks = ["niah_single_noise", "niah_multivalue", "variable_tracking", "common_words"]
    b = Builder(tok)
    by_tokens = {make_prompt(tok, t, 600, i, 0, b).tokens.tobytes(): make_prompt(tok, t, 600, i, 0, b).answers
                 for t in tasks for i in range(2)}
    monkeypatch.setattr(accuracy, "run_batch", _fake_run_batch(right, by_tokens, tok))
    rows = accuracy.evaluate(None, None, tok, [accuracy.Mode("full", None)], {}, [600], tasks, 2, 0, log=lambda s: None)
    scores = {r["task"]: r["score"] for r in rows}
    for t in tasks:
        assert scores[t] == (100.0 if right else 0.0), (t, rows)
    assert scores["ppl"] == pytest.approx(np.exp(2.0))
    assert {r["kind"] for r in rows} == {"retrieval", "aggregation", "ppl"}


def test_perplexity_text_of_another_domain(tok):
    """--ppl-text stdlib: Python standard-library source, deterministic per seed, of the asked length, unlike the
    KJV rows, and decodable to code; an unknown text is refused by name."""
    from convert.corpus import code_tokens, stdlib_sources

    code, lens = accuracy.ppl_prompts(tok, 300, 3, seed=1, text="stdlib")
    kjv, _ = accuracy.ppl_prompts(tok, 300, 3, seed=1)
    assert code.shape == kjv.shape == (3, 300) and code.dtype == np.int32 and lens.tolist() == [300 - 64] * 3
    np.testing.assert_array_equal(code, accuracy.ppl_prompts(tok, 300, 3, seed=1, text="stdlib")[0])
    assert len({tuple(r) for r in code}) == 3 and not np.array_equal(code, kjv)
    assert len(stdlib_sources()) > 50 and "def " in tok.decode(list(code_tokens(tok, 2000, 0)))
    with pytest.raises(ValueError, match="ppl text must be one of"):
        accuracy.ppl_prompts(tok, 300, 1, seed=0, text="wiki")


def test_suite_end_to_end_tiny_model(tok, tmp_path, monkeypatch):
    """The real path (serving prefill + decode_step over the hybrid cache) on a tiny random model: the schema,
    blocks_frac bounds, and full == dense_retrieval == oracle at p=1 when the window covers the prompt. A resumed
    run recomputes only the cells it lacks and gives the same rows."""
    from rtpurbo_jax.model_config import ModelConfig
    from rtpurbo_jax.params import init_params
    from rtpurbo_jax.indexer import init_indexer
    from rtpurbo_jax.sparse_config import SparseConfig

    cfg = ModelConfig(model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=1024)
    params = init_params(cfg, jax.random.key(0), scale=0.3)
    roles = np.zeros((2, 4), int)
    roles[0, 1] = roles[1, 2] = 1
    wide = SparseConfig(roles=roles.tolist(), window=1024, index_dim=4, seqlen_threshold=0)
    ix = {"shipped": init_indexer(cfg, 4, jax.random.key(1))}
    modes = accuracy.build_modes(wide, ["shipped"], [], seed=0,
                                 only=["full", "dense_retrieval", "rtpurbo", "oracle_topp", "topk_same_budget"])
    modes.append(accuracy.Mode("oracle_p1", dataclasses.replace(wide, selector="oracle", top_p=1.0), "shipped"))
    rows = accuracy.evaluate(params, cfg, tok, modes, ix, [400], ["niah_single_noise"], 2, 0, log=lambda s: None)
    keys = {"mode", "task", "kind", "length", "n", "score", "blocks_frac"}
    assert all(keys <= set(r) for r in rows)
    by = {(r["mode"], r["task"]): r for r in rows}
    for m in ("rtpurbo", "oracle_topp", "topk_same_budget"):
        assert 0.0 < by[(m, "niah_single_noise")]["blocks_frac"] <= 1.0
    assert by[("dense_retrieval", "ppl")]["blocks_frac"] == 1.0
    for m in ("dense_retrieval", "oracle_p1"):  # nothing dropped: the same perplexity as full attention
        assert by[(m, "ppl")]["score"] == pytest.approx(by[("full", "ppl")]["score"], rel=1e-4)
        assert by[(m, "niah_single_noise")]["sample"] == by[("full", "niah_single_noise")]["sample"]
    assert by[("rtpurbo", "ppl")]["score"] != pytest.approx(by[("full", "ppl")]["score"], rel=1e-6)
    for r in rows:  # per-prompt values behind every mean: the paired comparison's input
        per = r["nll_per_token"] if r["task"] == "ppl" else r["scores"]
        assert len(per) == 2
        if r["task"] != "ppl":
            assert np.mean(per) == pytest.approx(r["score"])
    pairs = {p["mode"]: p for p in accuracy.paired(rows, tasks=("niah_single_noise",))}
    assert pairs["oracle_p1"]["score_diff"] == 0 and pairs["oracle_p1"]["ppl_ratio"] == pytest.approx(1.0, rel=1e-4)
    assert pairs["rtpurbo"]["ppl_ratio"] != pytest.approx(1.0, rel=1e-6)

    calls, real = [], accuracy.run_batch
    monkeypatch.setattr(accuracy, "run_batch", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    done = {(r["mode"], r["task"], r["length"]): r for r in rows if r["mode"] != "rtpurbo"}
    saved = []
    again = accuracy.evaluate(params, cfg, tok, modes, ix, [400], ["niah_single_noise"], 2, 0, log=lambda s: None,
                              done=done, on_row=saved.append)
    assert len(calls) == 2 and all(c.top_p == wide.top_p and c.selector == "indexer" for c in calls)  # rtpurbo only
    assert saved == again and [(r["mode"], r["task"]) for r in again] == [(r["mode"], r["task"]) for r in rows]
    for r, w in zip(again, rows):
        assert r["score"] == pytest.approx(w["score"], rel=1e-6) and r["blocks_frac"] == w["blocks_frac"]


def test_results_file_is_never_replaced_silently_and_resumes_only_its_own_config(tmp_path):
    path = str(tmp_path / "acc.json")
    config = {"prompts": 20, "seed": 0, "model": "m", "device": "d"}
    assert accuracy.earlier_rows(path, config, resume=True, overwrite=False) == {}  # nothing to resume: fresh
    row = {"mode": "full", "task": "ppl", "kind": "ppl", "length": 400, "n": 20, "score": 3.0, "blocks_frac": None}
    write_json(path, {"model": "m", "device": "d", "config": {"prompts": 20, "seed": 0}, "rows": [row]})
    assert not os.path.exists(path + ".tmp")
    with pytest.raises(FileExistsError, match="--resume.*--overwrite"):
        accuracy.earlier_rows(path, config, resume=False, overwrite=False)
    assert accuracy.earlier_rows(path, config, resume=True, overwrite=False) == {("full", "ppl", 400): row}
    with pytest.raises(ValueError, match="device, prompts differ"):
        accuracy.earlier_rows(path, {**config, "prompts": 10, "device": "e"}, resume=True, overwrite=False)
    assert accuracy.earlier_rows(path, config, resume=False, overwrite=True) == {}
    assert json.load(open(path))["rows"] == [row]  # deciding to overwrite does not delete before new rows come


def test_oracle_selection_holds_top_p_of_exact_attention():
    """selector='oracle' selects from the head's exact attention: the kept blocks hold >= p of its mass."""
    from rtpurbo_jax.attention import selection_inputs
    from rtpurbo_jax.planner import retrieval_selection
    from rtpurbo_jax.sparse_config import SparseConfig

    rng = np.random.default_rng(0)
    b, s, h = 2, 200, 16
    qkv = {"q": jnp.asarray(rng.normal(size=(b, 1, 4, h)) * 2, jnp.float32)}
    k_full = jnp.asarray(rng.normal(size=(b, s, 2, h)), jnp.float32)
    sp = SparseConfig(roles=[[0, 1, 1, 0]], selector="oracle", top_p=0.8, kv_block=16, sinks=0, keep_recent=1,
                      seqlen_threshold=0)
    q_sel, k_sel, bias = selection_inputs(qkv, k_full, None, None, jnp.asarray([1, 2]), jnp.asarray([0, 1]), sp)
    kv_len = jnp.asarray([s, 150])
    q_pos = (kv_len - 1)[:, None]
    sel = np.asarray(retrieval_selection(q_sel, k_sel, bias, q_pos, jnp.ones((b, 1), bool), kv_len, sp, tile=1,
                                         dense=False))
    assert bias is None
    for bi in range(b):
        for j, n in enumerate((1, 2)):
            L = int(kv_len[bi])
            logits = np.asarray(qkv["q"][bi, 0, n]) @ np.asarray(k_full[bi, :L, n // 2]).T / np.sqrt(h)
            p = np.exp(logits - logits.max())
            p /= p.sum()
            blocks = np.repeat(sel[bi, j, 0], 16)[:L]
            assert p[blocks].sum() >= 0.8 - 1e-5
            assert blocks.mean() < 1.0  # and it is a real selection


def test_block_kl_is_zero_for_equal_logits_and_below_token_kl():
    rng = np.random.default_rng(1)
    tl = jnp.asarray(rng.normal(size=(2, 1, 5, 40)) * 3, jnp.float32)
    sl = jnp.asarray(rng.normal(size=(2, 1, 5, 40)) * 3, jnp.float32)
    mask = (jnp.arange(40)[None, :] <= 20 + jnp.arange(5)[:, None])[None, None]
    assert float(jnp.abs(_row_kl(tl, tl, mask, "block", 8)).max()) < 1e-5
    tok_kl, blk_kl = _row_kl(tl, sl, mask, "token", 8), _row_kl(tl, sl, mask, "block", 8)
    assert bool((blk_kl <= tok_kl + 1e-5).all()) and float(blk_kl.mean()) < float(tok_kl.mean())


def test_longrange_weight_counts_only_rows_that_look_far():
    """Rows whose teacher attends only to sinks + recent keys get weight 0: changing the student there does not
    change the loss; changing it at a far-looking row does."""
    r, b, t, h, i = 1, 1, 48, 8, 4
    rng = np.random.default_rng(2)
    q = np.zeros((r, b, t, h), np.float32)
    k = rng.normal(size=(r, b, t, h)).astype(np.float32)
    q[0, 0, 40] = 30 * k[0, 0, 5]  # row 40 looks 35 keys back; others are flat (q = 0): mass mostly local? no:
    hx = {"q": jnp.asarray(q), "k": jnp.asarray(k), "q_pre": jnp.asarray(rng.normal(size=(r, b, t, h)), jnp.float32),
          "k_pre": jnp.asarray(k)}
    tr = {"w_q": jnp.asarray(rng.normal(size=(r, h, i)), jnp.float32), "w_k": jnp.asarray(rng.normal(size=(r, h, i)), jnp.float32)}
    kw = dict(level="token", weight="longrange", kv_block=8, sinks=0, recent=48)  # everything is "recent" ...
    assert float(kl_loss(tr, hx, 16, **kw)) == 0.0  # ... so no row has far mass and nothing is weighted
    kw["recent"] = 8
    full = float(kl_loss(tr, hx, 16, **kw))
    hx2 = dict(hx, q_pre=hx["q_pre"].at[0, 0, 40].multiply(-1.0))  # perturb the student at the far row
    assert float(kl_loss(tr, hx2, 16, **kw)) != pytest.approx(full)


def test_local_prior_moves_forced_mass_and_grads_flow():
    from train.objective import recall_metrics

    rng = np.random.default_rng(3)
    r, b, t, h, i = 2, 1, 96, 8, 4
    hx = {n: jnp.asarray(rng.normal(size=(r, b, t, h)), jnp.float32) for n in ("q", "k", "q_pre", "k_pre")}
    tr = {"w_q": jnp.asarray(rng.normal(size=(r, h, i)), jnp.float32) * 0.3,
          "w_k": jnp.asarray(rng.normal(size=(r, h, i)), jnp.float32) * 0.3,
          "w_local": jnp.zeros((r, h)), "b_local": jnp.zeros((r,))}
    kw = dict(level="block", weight="uniform", kv_block=8, sinks=4, recent=8)
    g = jax.grad(lambda p: kl_loss(p, hx, 32, **kw))(tr)
    assert float(jnp.abs(g["b_local"]).sum()) > 0 and float(jnp.abs(g["w_local"]).sum()) > 0
    m0 = recall_metrics(tr, hx, top_p=0.9, kv_block=8, sinks=4, keep_recent=8)
    m1 = recall_metrics(dict(tr, b_local=jnp.full((r,), 5.0)), hx, top_p=0.9, kv_block=8, sinks=4, keep_recent=8)
    assert float(m1["selected_frac"]) < float(m0["selected_frac"])  # forced blocks carry more mass: fewer added


def test_retrieval_events_deterministic_and_answer_rows(tok):
    from rtpurbo_jax.evals.tasks import word_list
    from train.data import EventWindows, insert_events

    words = word_list("train")
    base = np.asarray(tok.encode(" In the beginning God created the heaven and the earth." * 200,
                                 add_special_tokens=False)[:1500], np.int32)
    a, rows_a = insert_events(base, tok, np.random.default_rng(0), words, 2.0)
    b2, rows_b = insert_events(base, tok, np.random.default_rng(0), words, 2.0)
    assert np.array_equal(a, b2) and rows_a == rows_b and len(a) == len(base) and rows_a
    assert "What is the code of" in tok.decode(a) and "The code of" in tok.decode(a)
    assert max(rows_a) < len(a) - 1
    ew = EventWindows(np.tile(base, 4), 512, 0, tok, 2.0)
    assert np.array_equal(ew.batch(3, 2), ew.batch(3, 2)) and not np.array_equal(ew.batch(3, 2), ew.batch(4, 2))


def test_stage1_loss_memory_is_linear_in_sequence_length():
    """The backward pass of the chunked loss keeps O(R · B · chunk · S) bytes, not every chunk's logits (O(S²):
    769 GiB for 50 heads at 32K before each chunk was rematerialised)."""
    r, b, t, h, i, chunk = 3, 1, 4096, 16, 4, 256
    ks = jax.random.split(jax.random.key(0), 6)
    hx = {n: jax.random.normal(k, (r, b, t, h)) for n, k in zip(["q", "k", "q_pre", "k_pre"], ks)}
    tr = {"w_q": jax.random.normal(ks[4], (r, h, i)), "w_k": jax.random.normal(ks[5], (r, h, i))}
    grad = jax.jit(jax.grad(lambda p: kl_loss(p, hx, chunk, level="block", weight="longrange")))
    temp = grad.lower(tr).compile().memory_analysis().temp_size_in_bytes
    one_chunk = r * b * chunk * t * 4  # one fp32 [R, B, C, S] tensor
    assert temp < 20 * one_chunk, (temp, one_chunk)  # all chunks' residuals would be (t / chunk) x several of them


def test_modes_share_a_prefill_only_when_their_caches_agree():
    """The suite runs one prefill per group of modes that write the same cache: every SparseConfig field decides
    (a field added later splits groups, never merges them), less the decode-only ones under dense prefill."""
    from benchmarks.accuracy import _prefill_key, build_modes
    from rtpurbo_jax.sparse_config import SparseConfig

    roles = np.zeros((2, 4), int)
    roles[0, 1] = roles[1, 2] = 1
    groups: dict = {}
    for m in build_modes(SparseConfig(roles=roles.tolist(), seqlen_threshold=0), ["a"], [2048], 0):
        groups.setdefault(_prefill_key(m), []).append(m.name)
    shared = next(g for g in groups.values() if "rtpurbo" in g)
    assert set(shared) == {"dense_retrieval", "rtpurbo", "rtpurbo_p0.95", "rtpurbo_p0.99", "oracle_topp"}
    for alone in ("rtpurbo_indexer_prefill", "rtpurbo_fp8_index", "dense_retrieval_w2048", "local_only"):
        assert [alone] in groups.values()
    from benchmarks.accuracy import Mode

    base = SparseConfig(roles=roles.tolist(), seqlen_threshold=0)
    assert _prefill_key(Mode("x", base, "a")) != _prefill_key(Mode("y", dataclasses.replace(base, kv_block=32), "a"))


def test_each_indexer_runs_at_its_own_width():
    """An indexer trained with another --index-dim than the converted model names: the modes that run with it
    carry its width (their caches' index keys follow); modes without an indexer keep the shipped one."""
    from benchmarks.accuracy import build_modes, index_dims
    from rtpurbo_jax.sparse_config import SparseConfig

    roles = np.zeros((2, 4), int)
    roles[0, 1] = 1
    shipped = SparseConfig(roles=roles.tolist(), seqlen_threshold=0, index_dim=16)
    dims = index_dims({"a": {"w_q": np.zeros((2, 4, 64, 8))}, "b": {"w_q": np.zeros((2, 4, 64, 32))}})
    assert dims == {"a": 8, "b": 32}
    modes = {m.name: m for m in build_modes(shipped, dims, [], 0)}
    assert modes["rtpurbo"].sparse.index_dim == modes["dense_retrieval"].sparse.index_dim == 8
    assert modes["rtpurbo@b"].sparse.index_dim == 32 and modes["local_only"].sparse.index_dim == 16
    assert modes["full"].sparse is None


def test_an_indexer_with_shared_key_maps_is_served_from_one_key_per_group():
    """The suite's modes that select with an indexer sharing its key maps per KV group store one index key per group
    (`SparseConfig.shared_index_keys`); an indexer with one map per head, and the oracle, do not."""
    from benchmarks.accuracy import build_modes, index_dims, with_shared_index_keys
    from rtpurbo_jax.sparse_config import SparseConfig

    roles = np.zeros((2, 4), int)
    roles[0, [0, 1]] = roles[1, 3] = 1  # 2 KV heads of 2 query heads: layer 0's group 0 has two retrieval heads
    rng = np.random.default_rng(0)
    own = {"w_q": rng.normal(size=(2, 4, 8, 4)), "w_k": rng.normal(size=(2, 4, 8, 4))}
    shared = {**own, "w_k": own["w_k"].copy()}
    shared["w_k"][0, 1] = shared["w_k"][0, 0]
    ixs = {"own": own, "shared": shared}
    shipped = SparseConfig(roles=roles.tolist(), seqlen_threshold=0, index_dim=4)
    modes = {m.name: m for m in with_shared_index_keys(build_modes(shipped, index_dims(ixs), [], 0), ixs, roles, 2)}
    assert modes["rtpurbo@shared"].sparse.shared_index_keys
    assert not modes["rtpurbo"].sparse.shared_index_keys and not modes["oracle_topp"].sparse.shared_index_keys
    assert modes["full"].sparse is None


def test_the_suite_scores_shared_index_keys_as_one_key_per_head(tok):
    """Through the suite's real path on a tiny model, an indexer with shared key maps scores the same prompts the
    same (scores, perplexity, blocks_frac) served from one index key per KV group as from one per head."""
    from rtpurbo_jax.indexer import init_indexer, share_key_maps
    from rtpurbo_jax.model_config import ModelConfig
    from rtpurbo_jax.params import init_params
    from rtpurbo_jax.sparse_config import SparseConfig

    cfg = ModelConfig(model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=1024)
    params = init_params(cfg, jax.random.key(0), scale=0.3)
    roles = np.zeros((2, 4), int)
    roles[0, [0, 1]] = roles[1, [2, 3]] = 1  # both heads of one KV group per layer
    sp = SparseConfig(roles=roles.tolist(), window=64, index_dim=4, seqlen_threshold=0, top_p=0.8, kv_block=16)
    ix = {"s": share_key_maps(init_indexer(cfg, 4, jax.random.key(1)), roles.astype(bool), 2)}
    modes = [accuracy.Mode("per_head", sp, "s"), accuracy.Mode("per_group", sp, "s")]
    modes = [modes[0]] + accuracy.with_shared_index_keys(modes[1:], ix, roles.astype(bool), 2)
    assert modes[1].sparse.shared_index_keys
    rows = accuracy.evaluate(params, cfg, tok, modes, ix, [400], ["niah_single_noise"], 2, 0, log=lambda s: None)
    by = {(r["mode"], r["task"]): r for r in rows}
    for task in ("niah_single_noise", "ppl"):
        a, b = by[("per_head", task)], by[("per_group", task)]
        assert b["score"] == pytest.approx(a["score"], rel=1e-5) and 0 < a["blocks_frac"] < 1
        assert b["blocks_frac"] == pytest.approx(a["blocks_frac"], rel=1e-6)


def test_paired_comparison_against_full_attention(tmp_path):
    """`paired`: per-prompt differences on the same prompts — mean, standard error, 95% interval, prompts that
    differ — over every task of the set, and the perplexity ratio; a mode lacking a task (or an older row
    without per-prompt values) gets no score difference."""
    from benchmarks.accuracy import describe_paired, paired

    rng = np.random.default_rng(0)
    tasks = ("a", "b")
    base = {t: rng.choice([0.0, 100.0], 50) for t in tasks}
    flip = {t: base[t].copy() for t in tasks}
    flip["a"][:3] = 100.0 - flip["a"][:3]  # three prompts change their outcome
    rows = [{"mode": m, "task": t, "length": 8, "scores": list(v[t])} for m, v in (("full", base), ("x", flip))
            for t in tasks]
    rows += [{"mode": m, "task": "ppl", "length": 8, "nll_per_token": list(np.full(10, 2.0) + (m == "x") * 0.01)}
             for m in ("full", "x")]
    rows += [{"mode": "y", "task": "a", "length": 8, "scores": list(base["a"])},  # no task b
             {"mode": "z", "task": "a", "length": 8, "score": 50.0}, {"mode": "z", "task": "b", "length": 8, "score": 50.0}]
    got = {p["mode"]: p for p in paired(rows, tasks=tasks)}
    d = np.concatenate([flip[t] - base[t] for t in tasks])
    assert got["x"]["n"] == 100 and got["x"]["differing"] == 3
    assert got["x"]["score_diff"] == pytest.approx(d.mean())
    assert got["x"]["stderr"] == pytest.approx(d.std(ddof=1) / 10)
    lo, hi = got["x"]["ci95"]
    assert lo < d.mean() < hi and hi - lo == pytest.approx(2 * 1.96 * d.std(ddof=1) / 10)
    assert got["x"]["ppl_ratio"] == pytest.approx(np.exp(0.01)) and got["x"]["ppl_ratio_ci95"][0] == pytest.approx(np.exp(0.01))
    assert "y" not in got and "z" not in got
    assert "NIAH" in describe_paired(got["x"]) and "ppl x1.0101" in describe_paired(got["x"])
    from benchmarks.accuracy import plot_paired

    res = {"model": "m", "device": "cpu", "paired_vs_full": paired(rows, tasks=tasks)}
    assert plot_paired(res, str(tmp_path / "p.png")) and (tmp_path / "p.png").stat().st_size > 1000
    assert not plot_paired({**res, "paired_vs_full": [{"mode": "x", "length": 8, "ppl_ratio": 1.0}]},
                           str(tmp_path / "q.png")) and not (tmp_path / "q.png").exists()


def test_compare_runs_pairs_the_same_prompts_across_files(tmp_path, capsys):
    """`--compare A.json B.json`: two runs of the same prompts (model, prompt count, seed) compared mode by mode,
    B minus A, paired; runs of other prompts are refused, naming what differs."""
    from benchmarks.accuracy import compare_runs, main

    task = "niah_single_noise"

    def run(scores_x, seed=0):
        rows = [{"mode": m, "task": t, "length": 8, "scores": list(v)} for m, v in (("full", [0, 100, 100, 0]),
                                                                                  ("x", scores_x)) for t in (task,)]
        return {"model": "m", "config": {"prompts": 4, "seed": seed}, "rows": rows}

    a, b = run([0, 0, 100, 0]), run([100, 100, 100, 0])
    got = {r["mode"]: r for r in compare_runs(a, b, tasks=(task,))}
    assert got["full"]["score_diff"] == 0 and got["full"]["differing"] == 0
    assert got["x"]["score_diff"] == 50.0 and got["x"]["differing"] == 2 and got["x"]["n"] == 4
    with pytest.raises(ValueError, match="same prompts.*seed"):
        compare_runs(a, run([0, 0, 0, 0], seed=1), tasks=(task,))
    for name, res in (("a.json", a), ("b.json", b)):
        (tmp_path / name).write_text(json.dumps(res))
    assert main(["--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--tasks", task]) == 0
    assert "x                          vs a.json: NIAH +50.00 points" in capsys.readouterr().out
    assert main(["--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--tasks", "niah_multikey"]) == 0
    assert "no (mode, length)" in capsys.readouterr().out
