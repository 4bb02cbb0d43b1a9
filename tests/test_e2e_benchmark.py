"""benchmarks.e2e's dense baseline computes the model serving computes, and its row arithmetic; the prefill selection
benchmark runs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import e2e
from rtpurbo_jax.params import init_params


def test_dense_baseline_equals_serving_full_attention():
    """The cuDNN-shaped baseline (whole-prompt prefill, MLP in chunks; decode over a dense cache masked by
    lengths), run with the XLA implementation on CPU, gives serving's full-attention logits (fp32)."""
    cfg = e2e.model_config(2, small=True)
    params = init_params(cfg, jax.random.key(0), jnp.float32, scale=0.2)
    t, max_len = 64, 96
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, t)), jnp.int32)
    logits, caches = e2e.dense_prefill_fn(cfg, max_len, 16)(params, tokens)
    dec = e2e.dense_decode_fn(cfg)
    errs = e2e.check_against_serving(params, cfg, tokens, logits, caches, dec, max_len, "reference")
    assert errs["check_rel_err_prefill"] < 1e-4 and errs["check_rel_err_decode"] < 1e-4, errs
    wrong = e2e.dense_prefill_fn(cfg, max_len, 16)(params, tokens[:, ::-1])[0]
    assert e2e.rel_err(wrong, logits) > 1e-2  # the check can fail


def test_scope_rows_and_extrapolation():
    raw = [{"mode": "dense_cudnn", "context": c, "layers_run": 4, "batch": 8, "phase": "decode", "ms": ms,
            "head_ms": 1.0, "density": 1.0, "peak_mem_gib": 1.0, "cache_gib": 4.0}
           for c, ms in ((100, 5.0), (200, 9.0))]
    raw.append({"mode": "dense_cudnn", "context": 400, "layers_run": 4, "batch": 8, "phase": "decode", "ms": None,
                "error": "RESOURCE_EXHAUSTED"})
    rows = e2e.extrapolate(e2e.scope_rows(raw, 32), raw)
    e2e.add_speedups(rows)
    got = {(r["context"], r["scope"]): r for r in rows}
    assert got[(100, "layer")]["ms"] == 1.0 and got[(100, "model")]["ms"] == 33.0
    assert got[(100, "model")]["measured"] is False and got[(100, "layer")]["measured"] is True
    assert got[(400, "layer")]["ms"] == 4.0 and got[(400, "layer")]["measured"] is False  # linear: 1, 2 -> 4
    assert got[(400, "model")]["ms"] == 129.0


def test_tpu_baseline_is_splash_attention_and_matches_xla():
    """benchmarks.baselines on a TPU: splash attention (Pallas TPU flash, GQA as MQA per KV group; interpret mode
    here) gives XLA's causal and sliding-window attention; GPUs name cuDNN."""
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import baselines

    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((1, 256, 4, 64), (1, 256, 2, 64), (1, 256, 2, 64)))
    for window in (None, 100):
        got = baselines.dense_attention(q, k, v, window=window, platform="tpu", interpret=True)
        want = baselines.dense_attention(q, k, v, window=window, platform="cpu")
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    assert (baselines.name("tpu"), baselines.name("gpu"), baselines.name("cpu")) == ("splash", "cudnn", "xla")


def test_fa2_baseline_is_causal_attention():
    """benchmarks.baselines.fa2_attention (the Pallas Triton flash kernel, interpret mode here) with GQA's K / V
    repeated per query head gives XLA's causal attention; K / V with fewer heads are refused."""
    from benchmarks import baselines

    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((1, 256, 4, 64), (1, 256, 2, 64), (1, 256, 2, 64)))
    got = baselines.fa2_attention(q, baselines.repeat_kv(k, 4), baselines.repeat_kv(v, 4), interpret=True,
                                  block_q=64, block_k=64)
    want = baselines.dense_attention(q, k, v, platform="cpu")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="repeat_kv"):
        baselines.fa2_attention(q, k, v, interpret=True)


def test_kernels_benchmark_times_the_fa2_baseline(monkeypatch):
    """benchmarks.kernels' FA2 row (the kernel in interpret mode, a short causal problem in the benchmark's head
    shape): checked against the dense result, recorded with its speed-up against cuDNN's time; plan rows get
    speedup_vs_fa2, and the paper-mix rows the paper's figure at 32K and 1M only."""
    import functools

    from benchmarks import baselines, kernels

    monkeypatch.setattr(baselines, "fa2_attention", functools.partial(baselines.fa2_attention, interpret=True))
    rng = np.random.default_rng(2)
    t = 256
    q = jnp.asarray(rng.normal(size=(1, t, kernels.N, kernels.H)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.normal(size=(1, t, kernels.K, kernels.H)), jnp.bfloat16) for _ in range(2))
    ref = baselines.dense_attention(q, k, v, platform="cpu")
    rows = []
    sec = kernels.fa2_row(q, k, v, ref, 2.0, 1.0, t, 1, 1, lambda **r: rows.append(r))
    assert sec > 0 and rows[0]["variant"] == "fa2_pallas_triton_dense" and rows[0]["rel_err"] < 2e-2
    assert rows[0]["speedup"] == pytest.approx(2.0 / sec)
    assert kernels.fa2_fields("random_10pct", 32768, None, 1.0) == {}
    assert kernels.fa2_fields("random_10pct", 32768, 3.0, 1.0) == {"speedup_vs_fa2": 3.0}
    assert kernels.fa2_fields("paper_mix_dense_retrieval", 32768, 3.0, 1.0)["paper_speedup_vs_fa2"] == 2.83
    assert kernels.fa2_fields("paper_mix_dense_retrieval", 131072, 3.0, 1.0)["paper_speedup_vs_fa2"] == 5.92
    assert "paper_speedup_vs_fa2" not in kernels.fa2_fields("paper_mix_dense_retrieval", 8192, 3.0, 1.0)


def test_kernels_plot_draws_the_fa2_panel_only_with_fa2_rows(tmp_path):
    """benchmarks.kernels.plot adds OUT_vs_fa2.png (paper-mix speed-ups against FA2 beside the paper's curve) only
    when the rows carry speedup_vs_fa2."""
    from benchmarks import kernels

    row = lambda t, **kw: {"length": t, "variant": "paper_mix_dense_retrieval", "backend": "mosaic_gpu",
                           "kv_block": 128, "speedup": 2.0, **kw}
    res = {"device": "test", "jax": "0", "rows": [row(32768), row(131072)]}
    kernels.plot(res, str(tmp_path / "a.png"))
    assert (tmp_path / "a.png").exists() and not (tmp_path / "a_vs_fa2.png").exists()
    res["rows"] = [row(32768, speedup_vs_fa2=3.1), row(131072, speedup_vs_fa2=4.0)]
    kernels.plot(res, str(tmp_path / "b.png"))
    assert (tmp_path / "b_vs_fa2.png").stat().st_size > 1000


def test_prefill_selection_benchmark_compares_backends_and_keeps_results(tmp_path):
    """`python -m benchmarks.prefill_selection` on a CPU (kernels interpreted): every backend selects the
    reference's blocks, rows carry the schema, an existing output is not replaced."""
    import json

    from benchmarks import prefill_selection

    out = str(tmp_path / "ps")
    assert prefill_selection.main(["--contexts", "384", "--heads", "2", "--interpret", "--out", out]) == 0
    rows = json.load(open(out + ".json"))["rows"]
    assert [r["backend"] for r in rows] == ["dense_attention_xla", "reference", "xla", "triton"]
    for r in rows[1:]:
        assert r["mismatch_frac"] == 0.0 and 0.0 < r["blocks_frac"] <= 1.0 and r["ms"] > 0
    with pytest.raises(SystemExit, match="2"):  # a usage error naming the file (tests/test_benchmark_outputs.py)
        prefill_selection.main(["--contexts", "384", "--interpret", "--out", out])


def test_merge_only_keeps_the_merged_runs_device_and_baseline(tmp_path):
    """`--contexts` with no value merges earlier files: the output names the device and dense baseline that ran
    them (a merge on a CPU must not relabel cuDNN rows as xla), and their rows get speed-ups."""
    import json

    raw = [{"mode": m, "context": 1024, "layers_run": 2, "batch": 1, "phase": "decode", "ms": ms, "head_ms": 0.1,
            "density": d, "cache_gib": 0.1, "peak_mem_gib": 1.0}
           for m, ms, d in (("dense_cudnn", 2.1, 1.0), ("rtpurbo", 1.1, 0.2))]
    src = tmp_path / "gpu.json"
    src.write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3", "config": {"dense_baseline": "cudnn"}, "raw": raw}))
    e2e.main(["--contexts", "--layers", "2", "--merge", str(src), "--out", str(tmp_path / "merged")])
    with open(tmp_path / "merged.json") as f:
        out = json.load(f)
    assert out["device"] == "NVIDIA H100 80GB HBM3"
    assert out["config"]["dense_baseline"] == "cudnn"
    layer = {r["mode"]: r for r in out["rows"] if r["scope"] == "layer"}
    assert layer["rtpurbo"]["speedup_vs_cudnn"] == pytest.approx(2.0 / 1.0)


def test_decode_density_from_a_trained_indexer_per_row(tmp_path):
    """--densities: a context within 10% of a length the accuracy suite measured takes the trained indexer's
    blocks_frac (mean over the retrieval tasks' rtpurbo rows; ppl and other modes ignored) as its decode target,
    and says so per row; other contexts take --density. Through main with the small shapes (one worker process)."""
    import json

    rows = [{"mode": m, "task": t, "kind": "ppl" if t == "ppl" else "retrieval", "length": 600, "score": 50.0,
             "blocks_frac": f} for m, t, f in (("rtpurbo", "niah_a", 0.2), ("rtpurbo", "niah_b", 0.4),
                                                ("rtpurbo", "ppl", 0.9), ("full", "niah_a", None))]
    acc = tmp_path / "acc.json"
    acc.write_text(json.dumps({"model": "tiny", "rows": rows}))
    trained = e2e.trained_densities([str(acc)])
    assert trained[600][0] == pytest.approx(0.3) and "tiny" in trained[600][1]
    assert e2e.density_for(640, trained, 0.15)[0] == pytest.approx(0.3)  # within 10% of 600
    assert e2e.density_for(1024, trained, 0.15) == (0.15, "flag (--density)")
    (tmp_path / "full_only.json").write_text(json.dumps({"rows": rows[3:]}))
    with pytest.raises(SystemExit, match="no rtpurbo rows"):
        e2e.trained_densities([str(tmp_path / "full_only.json")])
    with pytest.raises(SystemExit, match="no such file"):
        e2e.trained_densities([str(tmp_path / "missing.json")])

    e2e.main(["--small", "--contexts", "640", "--modes", "rtpurbo", "--layers", "1", "--batches", "1",
              "--decode-steps", "2", "--chunk", "256", "--densities", str(acc), "--out", str(tmp_path / "r")])
    with open(tmp_path / "r.json") as f:
        out = json.load(f)
    dec = [r for r in out["raw"] if r["phase"] == "decode"]
    assert dec and dec[0]["density_target"] == pytest.approx(0.3) and dec[0]["density_source"].startswith("trained")
    assert all(r["density_source"].startswith("trained") for r in out["rows"] if r["phase"] == "decode")
    assert "trained" in out["config"]["density_source"]


def test_shared_keys_mode_serves_one_index_key_per_group(tmp_path):
    """`rtpurbo_shared_keys`: the same model with an indexer sharing its key maps per KV group, served from one
    index key per group — decode rows at the target density, and a smaller cache than `rtpurbo`'s by 3/4 of its
    index keys (kv granularity: 4 heads per group). Through main with the small shapes."""
    import json

    e2e.main(["--small", "--contexts", "640", "--modes", "rtpurbo", "rtpurbo_shared_keys", "--layers", "1",
              "--batches", "1", "--decode-steps", "2", "--chunk", "256", "--out", str(tmp_path / "r")])
    with open(tmp_path / "r.json") as f:
        raw = json.load(f)["raw"]
    dec = {r["mode"]: r for r in raw if r["phase"] == "decode"}
    assert set(dec) == {"rtpurbo", "rtpurbo_shared_keys"} and all(r["ms"] > 0 for r in dec.values())
    sp = e2e.sparse_config(e2e.model_config(1, True), "rtpurbo", True)
    per_token_index = int(sp.roles_array[0].sum()) * sp.index_dim * 2  # layer 0's retrieval heads' keys, bf16
    saved = dec["rtpurbo"]["cache_gib"] - dec["rtpurbo_shared_keys"]["cache_gib"]
    assert saved * 2**30 == pytest.approx(0.75 * per_token_index * (640 + 256))  # the worker's max_len
