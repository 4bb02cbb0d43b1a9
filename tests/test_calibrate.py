"""Retrieval-head calibration: a planted copying head ranks first; determinism; rounding; clear errors."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert.__main__ import main
from convert.calibrate import CalibConfig, calibrate_model, head_count, select_roles
from rtpurbo_jax.checkpoint import load_converted, read_meta
from rtpurbo_jax.model_config import ModelConfig, RopeConfig
from rtpurbo_jax.params import init_params
from rtpurbo_jax.sparse_config import SparseConfig

CFG = ModelConfig(model_type="llama", vocab_size=211, hidden_size=64, intermediate_size=64, num_layers=3,
                  num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512,
                  rope=RopeConfig(theta=1e9))  # near-constant RoPE: scores depend on content only
PLANTED = (1, 3)  # layer 1, query head 3 (kv head 1)


def planted_params():
    """Random small weights, except one head whose q and k both project token identity: it attends to earlier
    copies of the current token, i.e. copies from far back (a retrieval head)."""
    p = init_params(CFG, jax.random.key(0), scale=0.02)
    p["embed"] = jax.random.normal(jax.random.key(1), p["embed"].shape)
    proj = jax.random.normal(jax.random.key(2), (CFG.hidden_size, CFG.head_dim)) * 0.5
    low_freq = np.isin(np.arange(16) % 8, [4, 5, 6, 7])  # RoPE pairs that barely rotate over 256 positions
    proj = proj * jnp.asarray(low_freq, jnp.float32)
    layer, head = PLANTED
    kv = head // CFG.group_size
    lp = dict(p["layers"])
    lp["wq"] = lp["wq"].at[layer, :, head * 16:(head + 1) * 16].set(proj)
    lp["wk"] = lp["wk"].at[layer, :, kv * 16:(kv + 1) * 16].set(proj)
    for name in ("wo", "w_down"):  # layer 0 writes nothing: layer 1 sees the exact token embeddings
        lp[name] = lp[name].at[0].set(0.0)
    p["layers"] = lp
    return p


CALIB = CalibConfig(ratio=0.25, calib_len=256, calib_docs=3, needle_len=16, window=32, probe_queries=32)


def test_planted_retrieval_head_ranks_first():
    report = calibrate_model(planted_params(), CFG, CALIB)
    scores = np.asarray(report["needle_score"])
    assert np.unravel_index(scores.argmax(), scores.shape) == PLANTED
    assert scores[PLANTED] > 3 * np.delete(scores.ravel(), PLANTED[0] * 4 + PLANTED[1]).max()
    assert report["roles"][PLANTED[0]][PLANTED[1]] == 1 and report["num_retrieval"] == 3  # round(0.25 * 12)


def test_scores_are_deterministic_for_a_seed():
    a = calibrate_model(planted_params(), CFG, CALIB)
    b = calibrate_model(planted_params(), CFG, CALIB)
    c = calibrate_model(planted_params(), CFG, dataclasses.replace(CALIB, seed=1))
    assert a["needle_score_per_doc"] == b["needle_score_per_doc"]
    assert a["needle_score_per_doc"] != c["needle_score_per_doc"]


@pytest.mark.parametrize("ratio,total,want", [(0.15, 270, 41), (0.15, 1536, 230), (0.1, 5, 1), (0.01, 12, 1),
                                              (1.0, 12, 12), (0.125, 12, 2)])
def test_head_count_rounds_half_up(ratio, total, want):
    assert head_count(ratio, total) == want


def test_select_roles_granularity_and_per_layer():
    scores = np.array([[0.9, 0.1, 0.2, 0.3], [0.05, 0.06, 0.8, 0.01]])
    np.testing.assert_array_equal(select_roles(scores, 2, "query", 2, False), [[1, 0, 0, 0], [0, 0, 1, 0]])
    np.testing.assert_array_equal(select_roles(scores, 2, "kv", 2, False), [[1, 1, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(select_roles(scores, 4, "kv", 2, False), [[1, 1, 0, 0], [0, 0, 1, 1]])
    np.testing.assert_array_equal(select_roles(scores, 2, "query", 2, True), [[1, 0, 0, 0], [0, 0, 1, 0]])


@pytest.mark.parametrize("bad,match", [(dict(ratio=0.0), "ratio"), (dict(ratio=1.5), "ratio"),
                                       (dict(calib_len=1024), "exceeds the model's 512 positions"),
                                       (dict(num_retrieval=13), "retrieval-heads"), (dict(calib_docs=0), "docs")])
def test_bad_arguments(bad, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(CALIB, **bad).validate(CFG)
    with pytest.raises(ValueError):
        head_count(0.0, 10)


def test_convert_cli_writes_roles_and_report(tmp_path):
    from tests.conftest import build_hf_model, save_hf

    src = save_hf(build_hf_model("qwen2"), str(tmp_path / "src"), "safetensors")
    out = str(tmp_path / "out")
    assert main(["--model", src, "--out", out, "--calib-len", "256", "--calib-docs", "2", "--window", "32",
                 "--retrieval-heads", "3", "--role-granularity", "kv"]) == 0
    meta = read_meta(out)
    sp = SparseConfig.from_dict(meta["sparse_config"])
    assert sp.roles_array.sum() == 4 and sp.granularity == "kv" and sp.window == 32  # round(3 / 2) = 2 groups
    hw = meta["extra"]["headwise_config"]
    assert SparseConfig.from_headwise(hw).roles == sp.roles
    report = json.load(open(os.path.join(out, "calibration.json")))
    assert np.asarray(report["needle_score"]).shape == (2, 4)
    assert os.path.getsize(os.path.join(out, "calibration.png")) > 1000
    assert load_converted(out).model_config.num_layers == 2
    assert main(["--model", src, "--out", str(tmp_path / "o2"), "--retrieval-ratio", "1.5"]) == 2
    assert main(["--model", src, "--out", str(tmp_path / "o3"), "--calib-len", "100000"]) == 2
    assert not os.path.exists(tmp_path / "o2") and not os.path.exists(tmp_path / "o3")
