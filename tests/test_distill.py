"""python -m train.distill on a tiny converted model: loss falls, resume is exact, sharding does not change
the loss, and bad input fails clearly."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from convert.__main__ import main as convert_main
from train.distill import main, parse_args, run
from tests.runs import assert_same_losses, losses

pytestmark = pytest.mark.usefixtures("xla_program_cache")  # whole runs of the same tiny model, many times


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A converted tiny model whose retrieval heads attend sharply (the planted copying head of the calibration
    tests, plus one ordinary head), pre-tokenized data, and a plain HF source for error cases."""
    from rtpurbo_jax.checkpoint import save_converted
    from rtpurbo_jax.sparse_config import SparseConfig
    from tests.conftest import build_hf_model, save_hf
    from tests.test_calibrate import CFG, PLANTED, planted_params

    root = tmp_path_factory.mktemp("distill")
    src = save_hf(build_hf_model("qwen2"), str(root / "src"), "safetensors")
    roles = np.zeros((CFG.num_layers, CFG.num_heads), int)
    roles[PLANTED] = 1
    roles[2, 0] = 1
    conv = save_converted(str(root / "conv"), planted_params(), CFG,
                          sparse_config=SparseConfig(roles=roles, window=32, keep_recent=8).to_dict())
    tokens = str(root / "tokens.npy")
    np.save(tokens, np.random.default_rng(0).integers(0, CFG.vocab_size, 30_000).astype(np.int32))
    return root, src, conv, tokens


def flags(tiny, run_dir, *extra):
    _, _, conv, tokens = tiny
    return ["--model", conv, "--data", tokens, "--run-dir", str(run_dir), "--seq-len", "64", "--batch", "4",
            "--index-dim", "4", "--kv-block", "16", "--chunk", "32", "--log-every", "1", "--ckpt-every", "2",
            "--init", "random", "--lr", "0.02", "--mesh", "1,1", *extra]


def test_loss_falls_and_recall_rises(tiny, tmp_path):
    summary = run(parse_args(flags(tiny, tmp_path / "r", "--steps", "30")))
    assert summary["after"]["loss"] < 0.7 * summary["before"]["loss"], summary
    # (recall counts the always-kept sink and recent blocks, as serving does: at 64 tokens it starts near 1)
    assert summary["after"]["recall"] > summary["before"]["recall"] and summary["after"]["recall"] > 0.99, summary
    assert os.path.exists(tmp_path / "r" / "curves.png") and os.path.isdir(tmp_path / "r" / "indexer")
    cfg = json.load(open(tmp_path / "r" / "config.json"))
    assert cfg["retrieval_heads"] == 2 and cfg["steps"] == 30


def test_relative_run_dir(tiny, tmp_path, monkeypatch):
    """The README runs with a relative --run-dir: every writer must accept it."""
    monkeypatch.chdir(tmp_path)
    run(parse_args(flags(tiny, "runs/rel", "--steps", "2")))
    assert (tmp_path / "runs" / "rel" / "indexer").is_dir() and (tmp_path / "runs" / "rel" / "summary.json").exists()


def test_resume_gives_the_same_losses(tiny, tmp_path):
    full = tmp_path / "full"
    part = tmp_path / "part"
    run(parse_args(flags(tiny, full, "--steps", "8")))
    run(parse_args(flags(tiny, part, "--steps", "8", "--stop-at", "4")))
    assert max(losses(part)) == 4
    run(parse_args(flags(tiny, part, "--steps", "8", "--resume")))
    a, b = losses(full), losses(part)
    for step in range(5, 9):
        np.testing.assert_allclose(b[step], a[step], rtol=1e-6, err_msg=f"step {step}")


def test_length_mix_cycles_window_lengths_and_resumes_exactly(tiny, tmp_path):
    """--length-mix: the steps alternate window lengths (each compiles once), the loss falls, and a run cut at
    an odd step resumes on the same lengths and windows."""
    full, part = tmp_path / "full", tmp_path / "part"
    mix = ("--length-mix", "32,64")
    summary = run(parse_args(flags(tiny, full, "--steps", "6", *mix)))
    assert summary["after"]["loss"] < summary["before"]["loss"], summary
    run(parse_args(flags(tiny, part, "--steps", "6", "--stop-at", "3", *mix)))
    run(parse_args(flags(tiny, part, "--steps", "6", "--resume", *mix)))
    a, b = losses(full), losses(part)
    for step in range(4, 7):
        np.testing.assert_allclose(b[step], a[step], rtol=1e-6, err_msg=f"step {step}")
    assert main(flags(tiny, part, "--steps", "6", "--resume")) == 2  # a resume must repeat --length-mix


def test_eight_devices_give_the_same_loss(tiny, tmp_path):
    import jax

    assert jax.device_count() == 8, "conftest sets 8 host devices"
    run(parse_args(flags(tiny, tmp_path / "one", "--steps", "4")))
    run(parse_args(flags(tiny, tmp_path / "eight", "--steps", "4", "--mesh", "4,2")))
    assert_same_losses(tmp_path / "one", tmp_path / "eight", 4, rtol=1e-5)


def test_bad_input_fails_clearly(tiny, tmp_path, capsys):
    root, src, conv, tokens = tiny
    assert main(flags(tiny, tmp_path / "a", "--top-p", "0")) == 2
    assert "--top-p" in capsys.readouterr().err
    assert main(flags(tiny, tmp_path / "b", "--seq-len", "100000")) == 2
    assert "exceeds the model's 512 positions" in capsys.readouterr().err
    assert main(flags(tiny, tmp_path / "c", "--mesh", "3,3")) == 2
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "rtpurbo.json").write_text(json.dumps({"format": "something-else"}))
    assert main(flags(tiny, tmp_path / "d") + ["--model", str(foreign)]) == 2
    assert "format" in capsys.readouterr().err
    noroles = str(tmp_path / "noroles")
    assert convert_main(["--model", src, "--out", noroles, "--no-calibrate"]) == 0
    assert main(flags(tiny, tmp_path / "e") + ["--model", noroles]) == 2
    assert "no retrieval-head roles" in capsys.readouterr().err
    assert main(flags(tiny, tmp_path / "f") + ["--model", str(tmp_path / "missing")]) == 2
    run(parse_args(flags(tiny, tmp_path / "g", "--steps", "2")))
    assert main(flags(tiny, tmp_path / "g", "--steps", "2")) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(flags(tiny, tmp_path / "h", "--length-mix", "32,128")) == 2  # longer than --seq-len 64
    assert "--length-mix lengths must lie in" in capsys.readouterr().err
    assert main(flags(tiny, tmp_path / "i", "--length-mix", "32;64")) == 2
    assert "comma-separated integers" in capsys.readouterr().err
    assert main(flags(tiny, tmp_path / "j", "--length-mix", "8,64")) == 2  # sinks + keep_recent take all 8 tokens
    assert "leaves nothing to select" in capsys.readouterr().err
    assert main(flags(tiny, tmp_path / "k", "--eval-lengths", "64")) == 2  # .npy data: no held-out text
    assert "needs the model's tokenizer" in capsys.readouterr().err


def test_shared_index_keys_train_one_key_map_per_kv_group(tiny, tmp_path, capsys):
    """--share-index-keys: retrieval heads of one layer reading one KV head train one w_k (exported equal in the
    per-head layout; their w_q stay their own), heads of other groups keep theirs; without it the same heads'
    w_k differ. The loss still falls."""
    from rtpurbo_jax.checkpoint import load_indexer, save_converted
    from rtpurbo_jax.sparse_config import SparseConfig
    from tests.test_calibrate import CFG, planted_params
    from rtpurbo_jax.indexer import key_groups

    heads = np.asarray([[1, 2], [1, 3], [2, 0], [2, 1], [2, 3]])
    assert key_groups(heads, 2).tolist() == [0, 0, 2, 2, 4]  # (layer, query head // 2)
    roles = np.zeros((CFG.num_layers, CFG.num_heads), int)
    roles[heads[:, 0], heads[:, 1]] = 1
    conv = save_converted(str(tmp_path / "conv"), planted_params(), CFG,
                          sparse_config=SparseConfig(roles=roles, window=32, keep_recent=8).to_dict())
    args = lambda d, *x: flags(tiny, tmp_path / d, "--model", conv, "--steps", "6", "--init", "pca", *x)
    summary = run(parse_args(args("shared", "--share-index-keys")))
    assert summary["after"]["loss"] < summary["before"]["loss"]
    ix = {k: np.asarray(v) for k, v in load_indexer(str(tmp_path / "shared" / "indexer"), CFG).items()}
    np.testing.assert_array_equal(ix["w_k"][1, 2], ix["w_k"][1, 3])
    np.testing.assert_array_equal(ix["w_k"][2, 0], ix["w_k"][2, 1])
    assert not np.allclose(ix["w_k"][2, 0], ix["w_k"][2, 3]) and not np.allclose(ix["w_q"][1, 2], ix["w_q"][1, 3])
    run(parse_args(args("own")))
    own = np.asarray(load_indexer(str(tmp_path / "own" / "indexer"), CFG)["w_k"])
    assert not np.allclose(own[1, 2], own[1, 3])
    capsys.readouterr()
    assert main(args("own", "--resume", "--share-index-keys")) == 2  # a resume may not switch it
    assert "--share-index-keys False -> True" in capsys.readouterr().err


def test_shared_index_keys_sharded_over_heads_give_the_same_loss(tiny, tmp_path):
    """The summed key-map gradient across a KV group stays exact when the retrieval heads are split over the
    mesh's model axis (4 heads over 2 shards, each group on one shard or across both)."""
    from rtpurbo_jax.checkpoint import save_converted
    from rtpurbo_jax.sparse_config import SparseConfig
    from tests.test_calibrate import CFG, planted_params

    roles = np.zeros((CFG.num_layers, CFG.num_heads), int)
    # rows (1, 2), (2, 0), (2, 1), (2, 3): the group of (2, 0) and (2, 1) spans the two shards of 2 rows each
    roles[[1, 2, 2, 2], [2, 0, 1, 3]] = 1
    conv = save_converted(str(tmp_path / "conv"), planted_params(), CFG,
                          sparse_config=SparseConfig(roles=roles, window=32, keep_recent=8).to_dict())
    args = lambda d, mesh: flags(tiny, tmp_path / d, "--model", conv, "--steps", "3", "--share-index-keys",
                                 "--mesh", mesh)
    run(parse_args(args("one", "1,1")))
    run(parse_args(args("eight", "4,2")))
    assert_same_losses(tmp_path / "one", tmp_path / "eight", 3, rtol=1e-5)


def test_shared_keys_pca_init_fits_one_basis_per_group():
    """With shared key maps the PCA init fits one basis per KV group (its heads' q rows and their k rows); a head
    alone in its group gets the per-head init's subspace, and every head of a group starts on the same map."""
    import jax
    from tests.test_calibrate import CFG
    from rtpurbo_jax.indexer import key_groups
    from train.objective import init_rows

    heads = np.asarray([[0, 0], [0, 1], [0, 2], [1, 3]])  # layer 0: heads 0, 1 share KV head 0
    rng = np.random.default_rng(3)
    calib = {k: jax.numpy.asarray(rng.normal(size=(4, 1, 50, CFG.head_dim)) * rng.uniform(0.2, 3, CFG.head_dim),
                                  jax.numpy.float32) for k in ("q_pre", "k_pre")}
    own = init_rows("pca", heads, CFG, 4, jax.random.key(0), calib, local_prior=False)
    shared = init_rows("pca", heads, CFG, 4, jax.random.key(0), calib, local_prior=False,
                       groups=key_groups(heads, 2))
    proj = lambda w: np.asarray(w @ w.T)  # the subspace, whatever the signs
    for r in (2, 3):  # alone in their groups: the same subspace as the per-head SVD
        np.testing.assert_allclose(proj(shared["w_q"][r]), proj(own["w_q"][r]), atol=1e-4)
    np.testing.assert_array_equal(shared["w_k"][0], shared["w_k"][1])
    np.testing.assert_array_equal(shared["w_q"][0], shared["w_k"][0])
    assert not np.allclose(proj(shared["w_k"][0]), proj(own["w_k"][0]), atol=1e-3)  # fitted on both heads' q


@pytest.mark.parametrize("init", ["pca", "rope_lowfreq"])
def test_every_init_trains(tiny, tmp_path, init):
    summary = run(parse_args(flags(tiny, tmp_path / init, "--steps", "6", "--init", init)))
    assert np.isfinite(summary["before"]["loss"]) and summary["after"]["loss"] < summary["before"]["loss"]


def test_corrupt_latest_checkpoint_falls_back_to_the_older_one(tiny, tmp_path):
    """A damaged newest checkpoint is set aside (kept) and the run resumes exactly from the one before it."""
    full, part = tmp_path / "full", tmp_path / "part"
    run(parse_args(flags(tiny, full, "--steps", "8")))
    run(parse_args(flags(tiny, part, "--steps", "8", "--stop-at", "4")))
    ck = part / "checkpoints" / "4"
    damaged = 0
    for d, _, fs in os.walk(ck):
        for f in fs:
            p = os.path.join(d, f)
            if os.path.getsize(p) > 64 and "ocdbt" in d + f:
                with open(p, "r+b") as fh:
                    fh.truncate(16)
                damaged += 1
    assert damaged
    run(parse_args(flags(tiny, part, "--steps", "8", "--resume")))
    assert (part / "corrupt_checkpoints" / "4").is_dir()
    a, b = losses(full), losses(part)
    for step in range(3, 9):
        np.testing.assert_allclose(b[step], a[step], rtol=1e-6, err_msg=f"step {step}")


def test_frozen_teacher_attention_backend():
    """Stage 1's teacher q / k take the attention backend and a mesh: "xla" gives the reference's q / k within
    fp32 sum order, so does the attention run per shard of a (2, 4) mesh (`shard_map`; the kernels per shard are
    pinned in test_rtpurbo_layer); an unknown name is refused."""
    import jax

    from rtpurbo_jax.params import init_params
    from tests.test_calibrate import CFG
    from train.distill import make_teacher
    from train.trainer import make_mesh

    params = init_params(CFG, jax.random.key(0), scale=0.3)
    tokens = jax.random.randint(jax.random.key(1), (2, 70), 0, CFG.vocab_size)
    heads = np.array([[0, 1], [CFG.num_layers - 1, 0]])
    ref = jax.jit(make_teacher(CFG, heads))(params, tokens)
    mesh = make_mesh("2,4")
    for backend, m in (("xla", None), ("reference", mesh)):
        got = jax.jit(make_teacher(CFG, heads, backend, m))(params, tokens)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="backend must be one of"):
        make_teacher(CFG, heads, "cudnn")(params, tokens)


@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory, smollm2_tokenizer):
    """A tiny random model with SmolLM2's tokenizer, converted into RUN/converted as the main job lays it out,
    and a 2-step stage 1 on the bundled corpus in RUN: (RUN, summary)."""
    import jax

    from rtpurbo_jax.checkpoint import save_converted
    from rtpurbo_jax.model_config import ModelConfig
    from rtpurbo_jax.params import init_params
    from rtpurbo_jax.sparse_config import SparseConfig

    tok = smollm2_tokenizer
    run_dir = tmp_path_factory.mktemp("tok") / "run"
    cfg = ModelConfig(model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=1024,
                      eos_token_id=tok.eos_token_id)
    roles = np.zeros((2, 4), int)
    roles[0, 1] = roles[1, 2] = 1
    conv = save_converted(str(run_dir / "converted"), init_params(cfg, jax.random.key(0), scale=0.3), cfg,
                          sparse_config=SparseConfig(roles=roles.tolist(), window=64, index_dim=4).to_dict(),
                          tokenizer=tok)
    summary = run(parse_args(["--model", conv, "--run-dir", str(run_dir), "--seq-len", "512", "--batch", "2",
                              "--steps", "2", "--index-dim", "4", "--chunk", "64", "--init", "random",
                              "--eval-passkey", "0", "--mesh", "1,1", "--log-every", "1", "--ckpt-every", "2"]))
    return run_dir, summary


def test_held_out_evaluation_with_a_tokenizer(with_tokenizer):
    """With the model's tokenizer, every evaluation row also scores held-out text the run never trains on:
    retrieval events in eval-split prose (`heldout_*`) and the accuracy suite's kinds of prompt over the eval
    split at their answer rows (`heldout_tasks_*`); fractions in [0, 1], in metrics.jsonl and the summary."""
    run_dir, summary = with_tokenizer
    for row in (summary["before"], summary["after"]):
        for k in ("heldout_top_hit", "heldout_recall", "heldout_tasks_top_hit", "heldout_tasks_recall",
                  "heldout_tasks_selected_frac", "heldout_tasks_oracle_frac"):
            assert 0.0 <= row[k] <= 1.0, (k, row)
    assert "heldout_tasks_top_hit" in json.loads(open(run_dir / "metrics.jsonl").readline())


def test_readme_python_runs_on_the_main_jobs_outputs(with_tokenizer, capsys):
    """Every ```python block of README.md, run as written on outputs laid out like the main job's
    (runs/distill-smollm2/{converted, indexer}; here a tiny model with SmolLM2's tokenizer)."""
    import re

    run_dir, _ = with_tokenizer
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert len(blocks) >= 2 and all("runs/distill-smollm2" in b for b in blocks)
    for block in blocks:
        scope: dict = {}
        exec(compile(block.replace("runs/distill-smollm2", str(run_dir)), "README.md", "exec"), scope)
    assert "tokens/s" in capsys.readouterr().out  # the serving example printed its text and speed
