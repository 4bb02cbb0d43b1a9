"""Stage 2 (`python -m train.distill --stage 2`): the top-k KL of eq. 7, the teacher cache, and the run on a tiny
converted model — loss falls, agreement rises, resume is exact, sharding does not change the loss."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtpurbo_jax.lm import apply
from rtpurbo_jax.sparse_config import SparseConfig
from train.distill import main as distill_main
from train.stage2 import parse_args, run
from train.teacher import TeacherCache, teacher_topk, top1_within_topk, topk_agreement, topk_kl
from tests.runs import assert_same_losses, losses

pytestmark = pytest.mark.usefixtures("xla_program_cache")  # whole runs of the same tiny model, many times


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A converted tiny model (local heads on a 16-token window, so sparse mode really differs from dense), its
    indexer, and pre-tokenized data."""
    from rtpurbo_jax.checkpoint import save_converted, write_params
    from rtpurbo_jax.indexer import init_indexer
    from rtpurbo_jax.params import init_params
    from tests.test_calibrate import CFG, PLANTED

    root = tmp_path_factory.mktemp("stage2")
    roles = np.zeros((CFG.num_layers, CFG.num_heads), int)
    roles[PLANTED] = roles[2, 0] = 1
    sparse = SparseConfig(roles=roles, window=16, sinks=2, kv_block=16, q_block=16, keep_recent=8, index_dim=4)
    params = init_params(CFG, jax.random.key(0), scale=0.2)  # sharp enough attention for a real sparse effect
    conv = save_converted(str(root / "conv"), params, CFG, sparse_config=sparse.to_dict(),
                          source=str(root / "TinyBase-1M.Q4_0.gguf"))  # results name it "tinybase-1m"
    ix = str(root / "indexer")
    write_params(ix, init_indexer(CFG, 4, jax.random.key(3)))
    tokens = str(root / "tokens.npy")
    np.save(tokens, np.random.default_rng(0).integers(0, CFG.vocab_size, 30_000).astype(np.int32))
    return CFG, conv, ix, tokens, sparse


def flags(tiny, run_dir, *extra):
    _, conv, ix, tokens, _ = tiny
    return ["--model", conv, "--indexer", ix, "--data", tokens, "--run-dir", str(run_dir), "--seq-len", "96",
            "--batch", "2", "--accumulate", "1", "--lr", "3e-3", "--warmup", "0", "--log-every", "1",
            "--ckpt-every", "3",
            "--mesh", "1,1", "--eval-batches", "1", *extra]


def test_topk_kl_is_zero_for_the_same_model_and_positive_otherwise():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 5, 50)) * 3, jnp.float32)
    ids, vals = teacher_topk(logits, 10)
    assert float(topk_kl(logits, ids, vals)) == pytest.approx(0.0, abs=1e-6)
    assert float(topk_agreement(logits, ids)) == 1.0 and float(top1_within_topk(logits, ids)) == 1.0
    other = logits + jnp.asarray(rng.normal(size=logits.shape), jnp.float32)
    kl = float(topk_kl(other, ids, vals))
    p = jax.nn.softmax(vals, -1)
    q = jax.nn.softmax(jnp.take_along_axis(other, ids, -1), -1)
    assert kl == pytest.approx(float((p * (jnp.log(p) - jnp.log(q))).sum(-1).mean()), rel=1e-5) and kl > 0
    mask = jnp.zeros((2, 5), bool).at[0, 1].set(True)
    assert float(topk_kl(other, ids, vals, mask)) == pytest.approx(
        float((p * (jnp.log(p) - jnp.log(q))).sum(-1)[0, 1]), rel=1e-5)


def test_topk_tail_kl_counts_the_mass_off_the_top_k():
    """`topk_tail_kl_at` is the KL over k + 1 outcomes (the top-k ids and "any other") computed from whole softmaxes;
    zero for the same distribution; positive where the student moved mass off the teacher's top-k, which eq. 7
    does not see (0 there); `rest_mass_at` is that mass."""
    from train.teacher import rest_mass_at, topk_kl_at, topk_tail_kl_at

    rng = np.random.default_rng(3)
    t_full = jnp.asarray(rng.normal(size=(2, 5, 50)) * 3, jnp.float32)
    ids, vals = teacher_topk(t_full, 10)
    t_lse = jax.nn.logsumexp(t_full, -1)
    at = lambda x: jnp.take_along_axis(x, ids, -1)

    def reference(s_full, mask=None):  # the k + 1 outcomes from whole softmaxes, in float64 numpy
        def buckets(x):
            x = np.asarray(x, np.float64)
            pr = np.exp(x - x.max(-1, keepdims=True))
            pr /= pr.sum(-1, keepdims=True)
            top = np.take_along_axis(pr, np.asarray(ids), -1)
            return np.concatenate([top, 1.0 - top.sum(-1, keepdims=True)], -1)
        p, q = buckets(t_full), buckets(s_full)
        kl = (p * (np.log(p) - np.log(q))).sum(-1)
        return kl.mean() if mask is None else kl[np.asarray(mask)].mean()

    same = topk_tail_kl_at(at(t_full), t_lse, vals, t_lse)
    assert abs(float(same)) < 1e-6
    other = t_full + jnp.asarray(rng.normal(size=t_full.shape), jnp.float32)
    mask = jnp.asarray(rng.random((2, 5)) < 0.6)
    for m in (None, mask):
        got = topk_tail_kl_at(at(other), jax.nn.logsumexp(other, -1), vals, t_lse, m)
        assert float(got) == pytest.approx(reference(other, m), rel=1e-4) and float(got) > 0
    # the student raises one token outside the teacher's top-10 everywhere: eq. 7 sees nothing, the tail KL does
    outside = np.ones(50, bool)
    outside[np.asarray(ids).reshape(-1, 10)] = False
    moved = t_full + jnp.where(jnp.asarray(np.arange(50) == np.flatnonzero(outside)[0]), 6.0, 0.0)
    assert float(topk_kl_at(at(moved), vals)) < 1e-6
    tail = float(topk_tail_kl_at(at(moved), jax.nn.logsumexp(moved, -1), vals, t_lse))
    assert tail == pytest.approx(reference(moved), rel=1e-4) and tail > 1e-2
    rest_t = float(rest_mass_at(at(t_full), t_lse))
    assert rest_t == pytest.approx(float(1 - jnp.exp(jax.nn.logsumexp(vals, -1) - t_lse).mean()), rel=1e-5)
    assert float(rest_mass_at(at(moved), jax.nn.logsumexp(moved, -1))) > rest_t + 0.1


def test_chunked_logsumexp_equals_the_full_one_with_its_gradient(tiny):
    """`lse_from_hidden` (rows at a time, each recomputed in the backward pass) and `topk_from_hidden(lse=True)`
    equal the logsumexp of the whole [B, T, V] logits; so does the gradient, with a chunk that does not divide T."""
    from rtpurbo_jax.checkpoint import load_converted
    from rtpurbo_jax.model import logits_from_hidden, lse_from_hidden, topk_from_hidden

    cfg, conv, _, _, _ = tiny
    params = load_converted(conv).params
    toks = jnp.asarray(np.random.default_rng(6).integers(0, cfg.vocab_size, (2, 37)), jnp.int32)
    hidden = apply(params, toks, cfg, return_hidden=True)
    w = jnp.asarray(np.random.default_rng(7).normal(size=(2, 37)), jnp.float32)
    full = lambda p, h: (jax.nn.logsumexp(logits_from_hidden(p, h, cfg), -1) * w).sum()
    chunked = lambda p, h: (lse_from_hidden(p, h, cfg, rows=8) * w).sum()
    np.testing.assert_allclose(np.asarray(lse_from_hidden(params, hidden, cfg, rows=8)),
                               np.asarray(jax.nn.logsumexp(logits_from_hidden(params, hidden, cfg), -1)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(topk_from_hidden(params, hidden, cfg, 10, rows=8, lse=True)[2]),
                               np.asarray(lse_from_hidden(params, hidden, cfg)), rtol=1e-6)
    g_full = jax.grad(full, argnums=(0, 1))(params, hidden)
    g_chunk = jax.jit(jax.grad(chunked, argnums=(0, 1)))(params, hidden)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g_full[0])) > 0
    for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_chunk)):
        np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32), rtol=1e-4, atol=1e-6)
    # needed rows (a loss on answer rows): rows 3 and 30 of sequence 0, 17 of sequence 1 -> chunks 0, 2 and 3 of 5
    # are taken, and chunks 1 and 4 (rows 8-15, 32-36), needed by neither sequence, are skipped and hold 0
    needed = np.zeros((2, 37), bool)
    needed[0, [3, 30]] = needed[1, 17] = True
    needed = jnp.asarray(needed)
    lse = jax.nn.logsumexp(logits_from_hidden(params, hidden, cfg), -1)
    got = lse_from_hidden(params, hidden, cfg, rows=8, needed=needed)
    taken = np.repeat(np.array([1, 0, 1, 1, 0], bool), 8)[:37]
    np.testing.assert_allclose(np.asarray(got)[:, taken], np.asarray(lse)[:, taken], rtol=1e-6)
    assert float(jnp.abs(lse).min()) > 0 and not np.asarray(got)[:, ~taken].any()
    masked = lambda f: lambda p, h: (f(p, h) * w * needed).sum()
    g_full = jax.grad(masked(lambda p, h: jax.nn.logsumexp(logits_from_hidden(p, h, cfg), -1)), argnums=(0, 1))(
        params, hidden)
    g_skip = jax.jit(jax.grad(masked(lambda p, h: lse_from_hidden(p, h, cfg, rows=8, needed=needed)),
                              argnums=(0, 1)))(params, hidden)
    for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_skip)):
        np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32), rtol=1e-4, atol=1e-6)


def test_dense_model_on_itself_has_zero_loss_and_gradient(tiny):
    """Distilled onto itself with sparsity off (full mode, or rtpurbo with a covering window and p = 1), the
    loss and its gradient are zero: the student's path adds nothing of its own."""
    from rtpurbo_jax.checkpoint import load_converted

    cfg, conv, _, _, sparse = tiny
    params = load_converted(conv).params
    toks = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 64)), jnp.int32)
    ids, vals = teacher_topk(apply(params, toks, cfg), 10)
    off = dataclasses.replace(sparse, window=64, top_p=1.0, seqlen_threshold=0)
    for kw in ({}, dict(mode="rtpurbo", sparse=off)):
        loss, g = jax.jit(jax.value_and_grad(lambda p: topk_kl(apply(p, toks, cfg, **kw), ids, vals)))(params)
        assert abs(float(loss)) < 1e-6
        assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g)) < 1e-5


@pytest.mark.parametrize("tie", [True, False])
def test_chunked_topk_and_metrics_equal_those_of_the_full_logits(tiny, tie):
    """The teacher's top-k and the held-out metrics from hidden states in row chunks (`topk_from_hidden`: the
    chunk does not divide T, so the last is padded) equal those of the whole [B, T, V] logits, tied or untied."""
    from rtpurbo_jax.checkpoint import load_converted
    from rtpurbo_jax.model import logits_at, logits_from_hidden, topk_from_hidden
    from train.teacher import top1_within_topk_at, topk_agreement_ids, topk_kl_at

    cfg, conv, _, _, _ = tiny
    params = load_converted(conv).params
    if not tie:
        cfg = dataclasses.replace(cfg, tie_word_embeddings=False)
        params = {**params, "lm_head": jax.random.normal(jax.random.key(7), params["embed"].T.shape) * 0.2}
    toks = jnp.asarray(np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 37)), jnp.int32)
    hidden = apply(params, toks, cfg, return_hidden=True)
    logits = logits_from_hidden(params, hidden, cfg)
    ids, vals = teacher_topk(logits, 10)
    c_ids, c_vals = jax.jit(lambda h: topk_from_hidden(params, h, cfg, 10, rows=8))(hidden)
    assert c_ids.shape == (2, 37, 10) and c_ids.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(c_ids), np.asarray(ids))
    np.testing.assert_allclose(np.asarray(c_vals), np.asarray(vals), rtol=1e-6, atol=1e-6)
    other = jax.tree.map(lambda x: x * 1.1, params)  # a student that differs from the teacher
    s_hidden = apply(other, toks, cfg, return_hidden=True)
    s_logits, s_at = logits_from_hidden(other, s_hidden, cfg), logits_at(other, s_hidden, cfg, ids)
    s_ids, _ = topk_from_hidden(other, s_hidden, cfg, 10, rows=16)
    w = jnp.asarray(np.random.default_rng(5).random((2, 37)) < 0.5)
    assert float(topk_agreement(s_logits, ids, w)) < 1.0  # the metrics below are not all trivially 1
    for full, chunked in ((topk_kl(s_logits, ids, vals, w), topk_kl_at(s_at, vals, w)),
                          (topk_agreement(s_logits, ids, w), topk_agreement_ids(s_ids, ids, w)),
                          (top1_within_topk(s_logits, ids, w), top1_within_topk_at(s_at, w))):
        assert float(chunked) == pytest.approx(float(full), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("tie", [True, False])
def test_step_loss_never_builds_vocab_logits_and_equals_the_full_one(tiny, tie):
    """The training step's eq. 7 from the student's logits at the teacher's ids (hidden states x the output
    embedding's k rows) equals it from the full [B, T, V] logits, value and gradient, tied or untied."""
    from rtpurbo_jax.checkpoint import load_converted
    from rtpurbo_jax.indexer import init_indexer
    from train.stage2 import student_logits
    from train.teacher import topk_kl_at

    cfg, conv, _, _, sparse = tiny
    params = load_converted(conv).params
    if not tie:
        cfg = dataclasses.replace(cfg, tie_word_embeddings=False)
        params = {**params, "lm_head": jax.random.normal(jax.random.key(7), params["embed"].T.shape) * 0.2}
    ix = init_indexer(cfg, sparse.index_dim, jax.random.key(3))
    sp = dataclasses.replace(sparse, prefill_mode="indexer", top_p=0.9, seqlen_threshold=0)
    toks = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 64)), jnp.int32)
    ids, vals = teacher_topk(apply(params, toks, cfg), 10)
    w = jnp.asarray(np.random.default_rng(3).random((2, 64)) < 0.5)
    full = lambda p: topk_kl(student_logits(p, toks, cfg, sp, ix), ids, vals, w)
    at = lambda p: topk_kl_at(student_logits(p, toks, cfg, sp, ix, at=ids), vals, w)
    (l1, g1), (l2, g2) = jax.value_and_grad(full)(params), jax.value_and_grad(at)(params)
    assert float(l1) > 1e-3 and float(l2) == pytest.approx(float(l1), rel=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-7)

    def subs(params_):  # the jaxprs inside an equation (scan / remat / pjit bodies)
        for v in params_.values():
            for x in (v if isinstance(v, (list, tuple)) else [v]):
                if hasattr(x, "eqns"):
                    yield x
                elif hasattr(x, "jaxpr") and hasattr(x.jaxpr, "eqns"):
                    yield x.jaxpr

    def vocab_sized(f):  # does any value of the gradient's program have the [B, T, V] shape?
        def walk(jaxpr):
            return any(any(getattr(v.aval, "shape", None) == (2, 64, cfg.vocab_size) for v in e.outvars)
                       or any(walk(sub) for sub in subs(e.params)) for e in jaxpr.eqns)
        return walk(jax.make_jaxpr(jax.grad(f))(params).jaxpr)

    assert vocab_sized(full) and not vocab_sized(at)


def test_bf16_model_trains_through_fp32_masters(tiny):
    """At the paper's lr (3e-6) an AdamW step moves a weight far less than half a bf16 ulp: updating bf16 weights in
    place leaves the model as it was. The step keeps fp32 masters (the forward runs on them cast to bf16): they
    move, and the loss is the bf16 model's."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from rtpurbo_jax.checkpoint import load_converted
    from rtpurbo_jax.indexer import init_indexer
    from train.stage2 import Stage2Config, build_step, make_optimizer, master_weights
    from train.trainer import make_mesh

    cfg, conv, _, _, sparse = tiny
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), load_converted(conv).params)
    dtypes = jax.tree.map(lambda x: x.dtype, bf16)
    sp = dataclasses.replace(sparse, prefill_mode="indexer", top_p=0.9, seqlen_threshold=0)
    ix = init_indexer(cfg, sparse.index_dim, jax.random.key(3))
    toks = jnp.asarray(np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 64)), jnp.int32)
    ids, vals = teacher_topk(apply(jax.tree.map(lambda x: x.astype(jnp.float32), bf16), toks, cfg), 10)
    rep = NamedSharding(make_mesh("1,1"), P())
    c = Stage2Config(model="x", indexer="x", lr=3e-6, warmup=0, accumulate=1)
    out = {}
    for name, params, dt in (("in_place", bf16, None), ("masters", master_weights(bf16), dtypes)):
        tx = make_optimizer(c, params)
        state = {"params": params, "opt_state": tx.init(params)}
        state_sh = jax.tree.map(lambda _: rep, state)
        step = build_step(cfg, sp, tx, state_sh, rep, rep, remat=False, dtypes=dt)
        new, m = step(jax.tree.map(jnp.copy, state), ix, toks, jnp.ones((2, 64)), ids, vals)
        pairs = list(zip(jax.tree.leaves(params), jax.tree.leaves(new["params"])))
        moved = sum(int((a != b).sum()) for a, b in pairs) / sum(a.size for a, _ in pairs)
        step_max = max(float(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)).max()) for a, b in pairs)
        out[name] = (float(m["loss"]), moved, step_max, pairs[0][1].dtype)
    assert out["in_place"][0] > 1e-3 and out["masters"][0] == pytest.approx(out["in_place"][0], rel=1e-6)
    assert out["in_place"][1] < 0.05, f"most bf16 weights should not move at lr 3e-6: {out}"
    assert out["masters"][1] > 0.5 and out["masters"][2] < 1e-5 and out["masters"][3] == jnp.float32, out


def test_loss_falls_and_agreement_rises(tiny, tmp_path):
    """Held-out windows: the KL of eq. 7 falls. (The agreement metrics are reported, not asserted here: on a tiny
    random model over random tokens the teacher's top-10 is nearly flat, and the student lowers the KL by
    flattening too — its top-1 and top-10 then drift; the real-model runs are where agreement is measured.)"""
    summary = run(parse_args(flags(tiny, tmp_path / "r", "--steps", "20", "--lr", "1e-2", "--eval-batches", "2")))
    assert summary["before"]["kl"] > 1e-2, "sparse mode should differ from the dense teacher"
    assert summary["after"]["kl"] < 0.6 * summary["before"]["kl"], summary
    # served dense, the student is the teacher before training (up to the cache's fp16 logits); training in sparse
    # mode moves it away
    assert summary["before"]["kl_dense"] < 1e-4 < summary["after"]["kl_dense"], summary
    for row in (summary["before"], summary["after"]):
        assert 0.0 <= row["topk_agreement"] <= 1.0 and 0.0 <= row["top1_within_topk"] <= 1.0
    assert os.path.exists(tmp_path / "r" / "model" / "rtpurbo.json")
    meta = json.load(open(tmp_path / "r" / "model" / "rtpurbo.json"))
    assert meta["sparse_config"]["roles"] == tiny[4].to_dict()["roles"]
    # the trained weights are served as they were trained, sparse at every length (the converted model: 16384)
    assert tiny[4].seqlen_threshold == 16384 and meta["sparse_config"]["seqlen_threshold"] == 0


def test_topk_tail_loss_holds_the_mass_off_the_top_k_and_caches_the_teacher_logsumexp(tiny, tmp_path):
    """--loss topk_tail: the teacher cache holds the logsumexp beside the top-k (meta "tail"); trained the same way,
    the student moves less probability off the teacher's top-10 than under eq. 7, which does not see it (on this
    tiny random model both drift: 0.80 -> 0.91 with the tail, -> 0.93 without); a cache made for eq. 7 is
    refused by a tail run."""
    kw = ("--steps", "12", "--lr", "1e-2")
    tail = run(parse_args(flags(tiny, tmp_path / "t", *kw, "--loss", "topk_tail")))
    eq7 = run(parse_args(flags(tiny, tmp_path / "e", *kw)))
    assert tail["before"]["rest_mass"] == pytest.approx(eq7["before"]["rest_mass"])
    assert 0 < eq7["before"]["rest_mass"] < 1
    drift = lambda r: r["after"]["rest_mass"] - r["before"]["rest_mass"]
    assert 0 < drift(tail) < drift(eq7) - 0.01, (tail, eq7)
    assert tail["after"]["kl_tail"] > 0 and "kl_tail" not in eq7["after"]
    assert json.load(open(tmp_path / "t" / "teacher" / "meta.json"))["tail"] is True
    with np.load(tmp_path / "t" / "teacher" / "shard_00000000.npz") as z:
        assert z["lse"].dtype == np.float32 and z["lse"].shape == z["logits"].shape[:-1]
    with pytest.raises(ValueError, match="other settings.*tail"):
        run(parse_args(flags(tiny, tmp_path / "e", *kw, "--loss", "topk_tail")))


def test_dense_weight_adds_the_dense_students_loss_and_keeps_the_dense_path(tiny):
    """`stage2_loss` with dense_weight W is the sparse student's loss plus W x the same loss of the student served
    dense (for eq. 7 and the tail loss), and a small step down it brings the dense path nearer the teacher than a
    step down the sparse loss alone. (Held-out kl_dense over whole runs is not asserted: on this tiny model over
    random tokens it drifts erratically either way.)"""
    from rtpurbo_jax.checkpoint import load_converted, load_indexer
    from rtpurbo_jax.model import logits_at, logits_from_hidden
    from train.stage2 import stage2_loss
    from train.teacher import topk_tail_kl_at

    cfg, conv, ix_dir, _, sparse = tiny
    params = load_converted(conv).params
    ix = load_indexer(ix_dir, cfg, sparse.index_dim)
    sp = dataclasses.replace(sparse, prefill_mode="indexer", seqlen_threshold=0)
    toks = jnp.asarray(np.random.default_rng(8).integers(0, cfg.vocab_size, (2, 64)), jnp.int32)
    teacher_params = jax.tree.map(lambda x: x * 1.05, params)  # a teacher the dense student differs from
    t_logits_full = apply(teacher_params, toks, cfg)
    ids, vals = teacher_topk(t_logits_full, 10)
    t_lse = jax.nn.logsumexp(t_logits_full, -1)
    w = jnp.ones((2, 64), jnp.float32)
    dense_h = apply(params, toks, cfg, attn_backend="xla", return_hidden=True)
    kw = dict(cfg=cfg, sparse=sp, attn_backend="xla")
    for loss, teacher, dense_term in (
            ("topk", (ids, vals), topk_kl(logits_from_hidden(params, dense_h, cfg), ids, vals, w)),
            ("topk_tail", (ids, vals, t_lse), topk_tail_kl_at(logits_at(params, dense_h, cfg, ids),
                                                              jax.nn.logsumexp(logits_from_hidden(params, dense_h, cfg), -1),
                                                              vals, t_lse, w))):
        alone = stage2_loss(params, ix, toks, w, teacher, loss=loss, **kw)
        both = stage2_loss(params, ix, toks, w, teacher, loss=loss, dense_weight=0.5, **kw)
        assert float(dense_term) > 1e-3
        assert float(both) == pytest.approx(float(alone) + 0.5 * float(dense_term), rel=1e-4)
    # a small step down the combined loss lowers the dense student's loss more than a step down the sparse one
    dense_kl = lambda q: float(topk_kl(apply(q, toks, cfg, attn_backend="xla"), ids, vals, w))
    step = lambda g: jax.tree.map(lambda x, d: x - 1e-2 * d, params, g)
    grad = lambda dw: jax.grad(lambda q: stage2_loss(q, ix, toks, w, (ids, vals), dense_weight=dw, **kw))(params)
    assert dense_kl(step(grad(1.0))) < dense_kl(step(grad(0.0))) - 1e-3 < dense_kl(params)
    # the export: a run that kept the dense path in its objective keeps the converted model's threshold (short calls
    # served dense); one that did not serves sparse at every length; --serve-threshold overrides both
    from train.stage2 import Stage2Config
    from train.stage2_export import export_threshold
    c = Stage2Config(model="m", indexer="i")
    assert export_threshold(c, 16384) == 0
    assert export_threshold(dataclasses.replace(c, dense_weight=1.0), 16384) == 16384
    assert export_threshold(dataclasses.replace(c, dense_weight=1.0, serve_threshold=4096), 16384) == 4096


def test_the_last_step_is_evaluated_once(tiny, tmp_path, monkeypatch):
    """The summary's "after" is the row run_loop evaluated at the last step (not a second pass over the held-out
    windows); a resumed run that has nothing left to train evaluates it itself."""
    import train.stage2 as stage2

    asked = []

    class Counting(stage2.Prefetch):  # the windows stage 2 asks for (teacher cache, training, evaluation)
        def __call__(self, i):
            asked.append(i)
            return super().__call__(i)

    monkeypatch.setattr(stage2, "Prefetch", Counting)
    summary = run(parse_args(flags(tiny, tmp_path / "r", "--steps", "2", "--ckpt-every", "100",
                                   "--eval-batches", "2")))
    evals = [i for i in asked if i >= 2]  # micro-steps 0, 1 train; 2, 3 are the held-out windows
    # the teacher cache reads each once; then 'before' and the last step's evaluation
    assert sorted(evals) == [2, 2, 2, 3, 3, 3], asked
    last = [r for r in map(json.loads, open(tmp_path / "r" / "metrics.jsonl")) if r.get("step") == 2
            and "kl" in r]
    assert summary["after"] == last[-1]
    asked.clear()
    again = run(parse_args(flags(tiny, tmp_path / "r", "--steps", "2", "--ckpt-every", "100", "--eval-batches", "2",
                                 "--resume")))
    assert again["after"]["kl"] == pytest.approx(summary["after"]["kl"], rel=1e-6) and 2 in asked


def test_a_data_mix_reports_its_held_out_kl_per_source(tiny, tmp_path):
    """--data A+B: the held-out windows alternate sources, --eval-batches of them per source (one each here), and
    each evaluation row carries kl@A / kl@B beside the mean (its mean over the windows of that source)."""
    tokens = tiny[3]
    other = str(tmp_path / "other.npy")
    np.save(other, np.random.default_rng(5).permutation(np.load(tokens)))
    summary = run(parse_args(flags(tiny, tmp_path / "r", "--steps", "1", "--eval-batches", "1",
                                   "--data", f"{tokens}+{other}")))
    a, b = os.path.basename(tokens), "other.npy"
    for row in (summary["before"], summary["after"]):
        assert row["kl"] == pytest.approx((row[f"kl@{a}"] + row[f"kl@{b}"]) / 2, rel=1e-5)
        assert row[f"kl@{a}"] != row[f"kl@{b}"] and f"kl_all_rows@{b}" in row


def test_warnings_for_short_windows_and_a_worse_student(tiny, tmp_path, capsys):
    """Windows the local heads see whole (seq-len <= sinks + window) are warned about up front; a run that ends
    further from the teacher than it began is warned about at the end, and so is one whose answer-row loss let
    the other rows drift (all-row KL up)."""
    from train.stage2_export import drift_note, regression_note

    run(parse_args(flags(tiny, tmp_path / "short", "--steps", "1", "--seq-len", "18")))  # sinks 2 + window 16
    assert "local heads see every key" in capsys.readouterr().out
    run(parse_args(flags(tiny, tmp_path / "long", "--steps", "1")))
    assert "local heads see every key" not in capsys.readouterr().out
    row = lambda kl, agree: {"kl": kl, "topk_agreement": agree}
    assert regression_note(row(0.02, 0.9), row(0.01, 0.95)) is None
    assert "rose from 0.0030 to 0.0211" in regression_note(row(0.003, 0.981), row(0.0211, 0.921))
    rows = lambda kl, all_rows: {"kl": kl, "kl_all_rows": all_rows}
    assert drift_note(rows(0.0073, 0.0216), rows(0.0032, 0.0200)) is None
    assert "all rows rose from 0.0216 to 0.0241" in drift_note(rows(0.0073, 0.0216), rows(0.0032, 0.0241))
    assert "--data tasks+kjv" in drift_note(rows(0.0073, 0.0216), rows(0.0032, 0.0241))
    # a mix that already trains prose on every row (session 26's Qwen run drifted anyway) gets other advice
    mixed = drift_note(rows(0.0189, 0.0224), rows(0.0103, 0.0229), mixed=True)
    assert "0.0224 to 0.0229" in mixed and "--dense-weight 1" in mixed and "--data tasks+kjv" not in mixed


def test_export_best_picks_the_lowest_held_out_kl(tiny, tmp_path):
    """--export best: model/ holds the weights of the evaluated step with the lowest held-out KL among those at hand
    (the start, kept checkpoints, the last step) — the same weights a run stopped at that step exports — and
    best_export_step skips steps whose weights are gone and takes the earliest on a tie."""
    from rtpurbo_jax.checkpoint import load_converted
    from train.stage2_export import best_export_step

    rows = [{"step": 0, "kl": 0.3}, {"step": 2, "kl": 0.1}, {"step": 4, "kl": 0.2}, {"step": 6, "kl": 0.1}]
    assert best_export_step(rows, {0, 2, 4, 6}) == 2 and best_export_step(rows, {0, 4, 6}) == 6
    assert best_export_step(rows[:1] + rows[2:3], {0, 4}) == 4 and best_export_step(rows[:1], {0, 9}) == 0

    extra = ("--lr", "0.3", "--ckpt-every", "1", "--keep", "10", "--eval-batches", "2")
    s = run(parse_args(flags(tiny, tmp_path / "best", "--steps", "5", "--export", "best", *extra)))
    evals = {r["step"]: r["kl"] for r in map(json.loads, open(tmp_path / "best" / "metrics.jsonl")) if "kl" in r}
    step = s["exported"]["step"]
    assert 0 < step < 5, f"lr 0.3 makes the KL rise, fall, rise: the restore path should be taken {evals}"
    assert step == min(evals, key=lambda k: (evals[k], k)) and s["exported"]["kl"] == evals[step]
    if step == 0:
        want = load_converted(tiny[1]).params
    else:
        run(parse_args(flags(tiny, tmp_path / "ref", "--steps", str(step), *extra)))
        want = load_converted(str(tmp_path / "ref" / "model")).params
    got = load_converted(str(tmp_path / "best" / "model")).params
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))


def test_accumulated_micro_steps_equal_one_big_batch(tiny, tmp_path):
    """Global batch by accumulation: one optimiser step over 2 micro-steps of 1 window trains the same weights as
    one step over a batch of the same 2 windows (every row in the loss: token data marks no answers). Tolerance:
    3% of one step (lr 3e-3), since Adam's first step is about lr x sign(g) and flips where g is rounding noise;
    a dropped or different micro-batch moves most weights by a whole step."""
    from rtpurbo_jax.checkpoint import load_converted

    run(parse_args(flags(tiny, tmp_path / "big", "--steps", "1", "--batch", "2", "--accumulate", "1")))
    run(parse_args(flags(tiny, tmp_path / "acc", "--steps", "1", "--batch", "1", "--accumulate", "2")))
    base, big, acc = (load_converted(p).params for p in (tiny[1], str(tmp_path / "big" / "model"),
                                                         str(tmp_path / "acc" / "model")))
    assert max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
               zip(jax.tree.leaves(base), jax.tree.leaves(big))) > 1e-4, "the step should move the weights"
    for a, b in zip(jax.tree.leaves(big), jax.tree.leaves(acc)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-4)


def test_resume_is_exact_and_the_cache_is_reused(tiny, tmp_path, capsys):
    run(parse_args(flags(tiny, tmp_path / "a", "--steps", "6")))
    run(parse_args(flags(tiny, tmp_path / "b", "--steps", "6", "--stop-at", "3")))
    run(parse_args(flags(tiny, tmp_path / "b", "--steps", "6", "--resume")))
    assert "(cached)" in capsys.readouterr().out
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(b) == list(range(1, 7))
    np.testing.assert_array_equal([b[s] for s in range(1, 7)], [a[s] for s in range(1, 7)])


def test_eight_devices_fsdp_give_the_same_loss(tiny, tmp_path):
    assert jax.device_count() == 8, "conftest sets 8 host devices"
    run(parse_args(flags(tiny, tmp_path / "one", "--steps", "3")))
    run(parse_args(flags(tiny, tmp_path / "eight", "--steps", "3", "--mesh", "2,4")))
    assert_same_losses(tmp_path / "one", tmp_path / "eight", 3, rtol=1e-4)


def test_attention_only_keeps_the_rest_frozen(tiny, tmp_path):
    """Also: the export keeps its base model's name (what the accuracy suite labels results with and
    `--compare` matches on), not the name of the directory it came from."""
    from rtpurbo_jax.checkpoint import load_converted, model_name, read_meta

    run(parse_args(flags(tiny, tmp_path / "att", "--steps", "2", "--trainable", "attention", "--serve-threshold",
                         "48")))
    old, new = load_converted(tiny[1]).params, load_converted(str(tmp_path / "att" / "model")).params
    np.testing.assert_array_equal(np.asarray(old["embed"]), np.asarray(new["embed"]))
    np.testing.assert_array_equal(np.asarray(old["layers"]["w_up"]), np.asarray(new["layers"]["w_up"]))
    assert np.abs(np.asarray(old["layers"]["wq"]) - np.asarray(new["layers"]["wq"])).max() > 0
    assert model_name(read_meta(str(tmp_path / "att" / "model"))) == model_name(read_meta(tiny[1])) == "tinybase-1m"
    assert read_meta(str(tmp_path / "att" / "model"))["sparse_config"]["seqlen_threshold"] == 48  # --serve-threshold


def test_loss_covers_only_the_marked_answer_rows(tiny, tmp_path, monkeypatch):
    """Data that marks answers (chat, tasks, events) restricts eq. 7 to those rows: with no row marked the loss
    and gradient are exactly 0; with rows marked, only they count; --positions all counts every row."""
    import train.stage2 as stage2
    from train.data import PackedWindows

    tokens = np.load(tiny[3])
    for name, marks in (("none", np.zeros(len(tokens), bool)), ("some", np.arange(len(tokens)) % 96 >= 80)):
        monkeypatch.setattr(stage2, "load_windows", lambda *a, m=marks, **k: PackedWindows(tokens, 96, 0, marks=m))
        run(parse_args(flags(tiny, tmp_path / name, "--steps", "2")))
    monkeypatch.setattr(stage2, "load_windows", lambda *a, **k: PackedWindows(tokens, 96, 0, marks=np.zeros(len(tokens), bool)))
    run(parse_args(flags(tiny, tmp_path / "all", "--steps", "2", "--positions", "all")))
    monkeypatch.undo()  # the .npy itself: no marks, every row
    run(parse_args(flags(tiny, tmp_path / "plain", "--steps", "2")))
    rows = lambda d: [json.loads(line) for line in open(tmp_path / d / "metrics.jsonl") if "grad_norm" in line]
    assert all(r["loss"] == 0.0 and r["grad_norm"] == 0.0 for r in rows("none"))
    some, full = rows("some"), rows("all")
    assert all(r["loss"] > 0 for r in some + full)
    assert some[0]["loss"] != pytest.approx(full[0]["loss"], rel=1e-3)
    np.testing.assert_allclose([r["loss"] for r in full], [r["loss"] for r in rows("plain")], rtol=1e-6)


def test_teacher_cache_resumes_and_refuses_other_settings(tmp_path):
    rng = np.random.default_rng(2)
    batches = {i: rng.integers(0, 30, (2, 8)).astype(np.int32) for i in range(5)}
    topk_fn = lambda t: teacher_topk(jax.nn.one_hot(t, 30) * 5.0 + 0.1 * jnp.arange(30), 3)
    cache = TeacherCache(str(tmp_path / "t"), {"data": "x"}, steps_per_shard=2)
    cache.build(5, batches.__getitem__, topk_fn, log=lambda *_: None)
    want = [cache.get(i) for i in range(5)]
    os.remove(str(tmp_path / "t" / "shard_00000002.npz"))  # a build killed after its first shard
    again = TeacherCache(str(tmp_path / "t"), {"data": "x"}, steps_per_shard=2)
    again.build(5, batches.__getitem__, topk_fn, log=lambda *_: None)
    for i in range(5):
        for x, y in zip(again.get(i), want[i]):
            np.testing.assert_array_equal(x, y)
        assert (again.get(i)[0][..., 0] == batches[i]).all()  # top-1 is the one-hot token
    with pytest.raises(ValueError, match="other settings.*data"):
        TeacherCache(str(tmp_path / "t"), {"data": "y"}, steps_per_shard=2).check_meta()


def test_teacher_cache_ignores_other_processes_files_in_flight(tmp_path, monkeypatch):
    """Processes share the folder: another one's shard may sit under a temporary name and vanish (renamed) while
    this one counts its bytes; the count covers this process's whole shards only (CI once died of this race)."""
    root = tmp_path / "t"
    root.mkdir()
    (root / "shard_00000000.p1.npz.tmp.npz").write_bytes(b"half")  # another process's write in flight
    real = os.path.getsize
    monkeypatch.setattr(os.path, "getsize", lambda p: (_ for _ in ()).throw(FileNotFoundError(p))
                        if ".tmp" in str(p) else real(p))  # ...renamed away between a listing and a stat
    rng = np.random.default_rng(3)
    batches = {i: rng.integers(0, 30, (2, 8)).astype(np.int32) for i in range(3)}
    cache = TeacherCache(str(root), {"data": "x"}, steps_per_shard=2)
    size = cache.build(3, batches.__getitem__, lambda t: teacher_topk(jax.nn.one_hot(t, 30), 3),
                       log=lambda *_: None)
    shards = sorted(f for f in os.listdir(root) if f.startswith("shard_") and ".tmp" not in f)
    assert shards == ["shard_00000000.npz", "shard_00000002.npz"]
    assert size == sum(real(root / f) for f in shards)


def test_stage_flag_and_bad_input(tiny, tmp_path, capsys):
    assert distill_main(["--stage", "3"]) == 2
    assert "--stage must be 1 or 2" in capsys.readouterr().err
    assert distill_main(["--stage", "2", *flags(tiny, tmp_path / "x", "--trainable", "heads")]) == 2
    assert "--trainable" in capsys.readouterr().err
    assert distill_main(["--stage", "2", "--model", tiny[1]]) == 2
    assert "--indexer" in capsys.readouterr().err
    assert distill_main(["--stage", "2", *flags(tiny, tmp_path / "y", "--positions", "some")]) == 2
    assert "--positions must be" in capsys.readouterr().err
    assert distill_main(["--stage", "2", *flags(tiny, tmp_path / "y", "--dense-weight", "-1")]) == 2
    assert "--dense-weight must be" in capsys.readouterr().err
    assert distill_main(["--stage", "2", *flags(tiny, tmp_path / "z", "--serve-threshold", "-5")]) == 2
    assert "--serve-threshold must be >= 0" in capsys.readouterr().err
    assert distill_main(["--stage", "2", *flags(tiny, tmp_path / "y", "--loss", "kl")]) == 2
    assert "--loss must be one of" in capsys.readouterr().err
    assert distill_main(["--stage", "2", *flags(tiny, tmp_path / "z", "--data", "tasks")]) == 2
    assert "tokenizer" in capsys.readouterr().err
    # the held-out evaluation needs a window: refused before the teacher pass, not an IndexError after it
    assert distill_main(["--stage", "2", *flags(tiny, tmp_path / "w", "--eval-batches", "0")]) == 2
    assert "--eval-batches" in capsys.readouterr().err


def test_stage2_summary_merges_before_and_after(tmp_path):
    from benchmarks import stage2_summary

    row = lambda mode, task, kind, score, bf=None: {"mode": mode, "task": task, "kind": kind, "length": 64, "n": 2,
                                                     "score": score, "blocks_frac": bf}
    before = {"model": "m", "device": "d", "date": "x", "config": {}, "rows": [
        row("rtpurbo", "a", "retrieval", 50.0, 0.2), row("rtpurbo", "b", "retrieval", 0.0, 0.4),
        row("rtpurbo", "ppl", "ppl", 9.0, 0.5)]}
    after = {**before, "rows": [row("rtpurbo", "a", "retrieval", 100.0, 0.3), row("rtpurbo", "b", "retrieval", 50.0, 0.3)]}
    for name, d in (("acc_stage1", before), ("acc_stage2", after)):
        (tmp_path / f"{name}.json").write_text(json.dumps(d))
    assert stage2_summary.main([str(tmp_path)]) == 0
    merged = json.load(open(tmp_path / "accuracy_stage2.json"))
    assert [r["mode"] for r in merged["rows"]] == ["rtpurbo"] * 3 + ["rtpurbo_stage2"] * 2
    t = stage2_summary.table(merged["rows"])
    assert t[("rtpurbo", 64)] == {"retrieval": 25.0, "ppl": 9.0, "blocks_frac": pytest.approx(0.3)}
    assert t[("rtpurbo_stage2", 64)]["retrieval"] == 75.0
    assert (tmp_path / "accuracy_stage2.png").stat().st_size > 0


def test_memory_accounting_matches_the_arrays_stage2_places(tiny):
    """benchmarks.stage2_memory's per-device bytes (abstract mesh, eval_shape) equal the bytes the real stage-2
    shardings put on one device, for params and AdamW moments, on the 8-device CPU mesh."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from benchmarks.stage2_memory import GIB, account
    from rtpurbo_jax.params import init_params, param_shardings
    from train.stage2 import Stage2Config, make_optimizer, state_rules
    from train.trainer import make_mesh

    cfg = tiny[0]
    c = Stage2Config(model="x", indexer="x", batch=8)  # the global batch 8 in one micro-step: no accumulator
    mesh = make_mesh("8,1")
    sh = param_shardings(cfg, mesh, state_rules(c))
    params = jax.device_put(init_params(cfg, jax.random.key(0)), sh)
    opt = make_optimizer(c, params).init(params)
    rep = NamedSharding(mesh, P())
    opt = jax.device_put(opt, jax.tree.map(lambda x: x.sharding if isinstance(x.sharding, NamedSharding) else rep, opt))
    on0 = lambda tree: sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device.id == 0)
    got = account(cfg, 8, 96, 8, jnp.float32)["gib_per_device"]
    assert got["params"] * GIB == on0(params)
    assert got["optimizer_state"] * GIB == pytest.approx(on0(opt), abs=64)  # counters: a few scalar bytes
    # one sequence per micro-step: 8 micro-steps (the paper's global batch 8), MultiSteps adds an fp32 gradient sum
    one = account(cfg, 8, 96, 1, jnp.float32)["gib_per_device"]
    assert one["optimizer_state"] == pytest.approx(got["optimizer_state"] + got["grads"], abs=1e-6)
    assert account(cfg, 8, 96, 8, jnp.float32, fsdp=False)["gib_per_device"]["params"] > got["params"]
    half = account(cfg, 8, 96, 8, jnp.bfloat16)["gib_per_device"]  # a bf16 model trains fp32 masters beside its cast
    assert half["params"] == got["params"] and half["params_cast"] == got["params"] / 2 and got["params_cast"] == 0


def test_teacher_benchmark_writes_rows_and_plot(tmp_path):
    """`python -m benchmarks.teacher` at a short length: a row per backend, the later ones compared with the
    first (xla: bf16 dots against the reference's fp32 scores), the JSON's fields and the PNG beside it."""
    import json

    from benchmarks import teacher

    out = tmp_path / "t.json"
    assert teacher.main(["--seq-len", "80", "--reps", "1", "--backends", "reference", "xla", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["backend"] for r in res["rows"]] == ["reference", "xla"]
    assert res["seq_len"] == 80 and res["jax"] == jax.__version__ and res["speedup_vs_first"]["xla"] > 0
    xla = res["rows"][1]
    assert xla["windows_per_s"] > 0 and 0.5 < xla["topk_overlap_with_first"] <= 1.0
    assert (tmp_path / "t.png").stat().st_size > 1000


def test_stage2_summary_runs_json_reproduces_committed_summaries(tmp_path):
    """`python -m benchmarks.stage2_summary --runs FOLDER` rebuilds each committed Qwen stage-2 folder's
    summary.json from its runs.json (the folders read each other's suites, so all are copied)."""
    import shutil

    from benchmarks import stage2_summary

    results = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results")
    folders = sorted(d for d in os.listdir(results) if os.path.exists(os.path.join(results, d, "runs.json")))
    assert len(folders) >= 4
    for d in folders:
        shutil.copytree(os.path.join(results, d), tmp_path / d, ignore=shutil.ignore_patterns("*.png", "*.tgz"))
    for d in folders:
        committed = json.load(open(tmp_path / d / "summary.json"))
        (tmp_path / d / "summary.json").unlink()
        assert stage2_summary.main(["--runs", str(tmp_path / d)]) == 0
        assert json.load(open(tmp_path / d / "summary.json")) == committed, d
        assert (tmp_path / d / "summary.png").stat().st_size > 0
    assert stage2_summary.main(["--runs", str(tmp_path)]) == 2  # no runs.json there: refused, nothing written
    assert not (tmp_path / "summary.json").exists()
    assert stage2_summary.main(["--runs"]) == 2


def test_step_benchmark_times_eq7_and_the_tail_step(tmp_path):
    """`benchmarks.stage2_step --small` on the CPU: per backend the forward, the eq. 7 step, the step with dense
    retrieval heads and the `--loss topk_tail` step, on every row and on answer rows only, each timed (no error
    row)."""
    from benchmarks.stage2_step import step_rows

    rows = step_rows("smollm2", 128, reps=1, small=True, backends=("xla",))
    assert [r["phase"] for r in rows] == ["fwd", "step", "step_dense_retrieval", "step_tail", "step_tail_answers"]
    assert all("error" not in r and r["ms"] > 0 for r in rows), rows
