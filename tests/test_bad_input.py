"""Issue 14: nothing a user made is deleted, and bad input fails at the API boundary with a clear error
naming the argument — convert --overwrite, serving inputs, train.distill flags and run directories."""

from __future__ import annotations

import dataclasses
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert.__main__ import main as convert_main
from tests.conftest import build_hf_model, save_hf


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return save_hf(build_hf_model("llama"), str(tmp_path_factory.mktemp("src") / "llama"), "safetensors")


def _snapshot(path):
    return sorted((os.path.relpath(os.path.join(d, f), path), os.path.getsize(os.path.join(d, f)))
                  for d, _, fs in os.walk(path) for f in fs)


def test_overwrite_never_deletes_the_source(src, capsys):
    before = _snapshot(src)
    assert convert_main(["--model", src, "--out", src, "--overwrite"]) == 2
    assert "source" in capsys.readouterr().err
    assert convert_main(["--model", src, "--out", os.path.dirname(src), "--overwrite"]) == 2  # holds the source
    assert _snapshot(src) == before


def test_overwrite_never_deletes_the_working_directory(src, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    assert convert_main(["--model", src, "--out", ".", "--overwrite"]) == 2
    assert "current directory" in capsys.readouterr().err and (work / "notes.txt").read_text() == "mine"


def test_overwrite_refuses_a_converted_dir_with_user_files(src, tmp_path, capsys):
    out = tmp_path / "conv"
    assert convert_main(["--model", src, "--out", str(out), "--no-calibrate"]) == 0
    (out / "my_eval_results.json").write_text("{}")
    assert convert_main(["--model", src, "--out", str(out), "--no-calibrate", "--overwrite"]) == 2
    assert "my_eval_results.json" in capsys.readouterr().err and (out / "my_eval_results.json").exists()
    os.remove(out / "my_eval_results.json")
    assert convert_main(["--model", src, "--out", str(out), "--no-calibrate", "--overwrite"]) == 0


@pytest.fixture(scope="module")
def served():
    from rtpurbo_jax.model_config import ModelConfig
    from rtpurbo_jax.params import init_params
    from rtpurbo_jax.indexer import init_indexer
    from rtpurbo_jax.sparse_config import SparseConfig

    cfg = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=128)
    roles = np.zeros((2, 4), int)
    roles[0, 1] = 1
    sp = SparseConfig(roles=roles.tolist(), window=8, index_dim=4, kv_block=8, q_block=8, seqlen_threshold=0)
    return cfg, init_params(cfg, jax.random.key(0), scale=0.2), sp, init_indexer(cfg, 4, jax.random.key(1))


@pytest.mark.parametrize("case,match", [
    ("past_capacity", "cache holds 24 positions"), ("length_zero", "lengths must lie in 1..16"),
    ("length_over_T", "lengths must lie in 1..16"), ("id_over_vocab", r"\[0, 64\)"), ("id_negative", r"\[0, 64\)"),
    ("float_tokens", "integer ids"), ("no_indexer", "no indexer weights"), ("wrong_index_dim", "expected"),
])
def test_prefill_refuses_what_it_cannot_do(served, case, match):
    from rtpurbo_jax.kv_cache import init_cache
    from rtpurbo_jax.serving import prefill

    cfg, params, sp, ix = served
    cache = init_cache(cfg, 2, 24, sp, jnp.float32)
    toks = np.random.default_rng(0).integers(0, 64, (2, 16)).astype(np.int32)
    lengths = np.asarray([16, 10], np.int32)
    if case == "past_capacity":
        toks, lengths = np.tile(toks, 2), np.asarray([30, 10], np.int32)
    elif case == "length_zero":
        lengths = np.asarray([0, 10], np.int32)
    elif case == "length_over_T":
        lengths = np.asarray([17, 10], np.int32)
    elif case == "id_over_vocab":
        toks[1, 3] = 64
    elif case == "id_negative":
        toks[0, 0] = -1
    elif case == "float_tokens":
        toks = toks.astype(np.float32)
    elif case == "no_indexer":
        ix = None
    elif case == "wrong_index_dim":
        ix = {k: v[..., :2] for k, v in ix.items()}
    with pytest.raises(ValueError, match=match):
        prefill(params, cache, jnp.asarray(toks), jnp.asarray(lengths), ix, cfg=cfg, sparse=sp, chunk=8)


def test_decode_step_refuses_past_max_len_and_bad_ids(served):
    from rtpurbo_jax.kv_cache import init_cache
    from rtpurbo_jax.serving import decode_step, prefill

    cfg, params, sp, ix = served
    cache = init_cache(cfg, 1, 17, sp, jnp.float32)
    toks = jnp.asarray(np.random.default_rng(1).integers(0, 64, (1, 16)), jnp.int32)
    lg, cache = prefill(params, cache, toks, jnp.asarray([16]), ix, cfg=cfg, sparse=sp, chunk=8)
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        decode_step(params, cache, jnp.asarray([99]), ix, cfg=cfg, sparse=sp)
    lg, cache = decode_step(params, cache, jnp.asarray([3]), ix, cfg=cfg, sparse=sp)  # position 16: the last slot
    with pytest.raises(ValueError, match="cache holds 17 positions"):
        decode_step(params, cache, jnp.asarray([3]), ix, cfg=cfg, sparse=sp)


def test_sampling_refuses_nan_temperature():
    from rtpurbo_jax.sampling import SamplingConfig

    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="temperature"):
            SamplingConfig(temperature=bad)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=float("nan"))


import tests.test_distill as _distill  # noqa: E402

flags, tiny = _distill.flags, _distill.tiny  # tiny: the tiny converted model fixture


def test_distill_cli_reads_negative_mesh_and_refuses_bad_numbers():
    from train.distill import parse_args

    assert parse_args(["--mesh", "-1,1"]).mesh == "-1,1"  # the README's own form
    for argv, match in ((["--lr", "nan"], "--lr"), (["--grad-clip", "-1"], "--grad-clip"),
                        (["--kv-block", "0"], "--kv-block"), (["--chunk", "0"], "--chunk"),
                        (["--lr", "inf"], "--lr"), (["--weight-decay", "nan"], "--weight-decay"),
                        (["--eval-len", "-5"], "--eval-len")):
        with pytest.raises(ValueError, match=match):
            parse_args(argv).validate()


def test_distill_resume_refuses_changed_flags_and_stops_on_nan(tiny, tmp_path, capsys):
    from train.distill import main

    run = tmp_path / "r"
    assert main(flags(tiny, run, "--steps", "4", "--stop-at", "2")) == 0
    assert main(flags(tiny, run, "--steps", "6", "--resume")) == 2  # another schedule
    assert "--steps 4 -> 6" in capsys.readouterr().err
    assert main(flags(tiny, run, "--steps", "4", "--resume")) == 0
    steps = [__import__("json").loads(l)["step"] for l in open(run / "metrics.jsonl")]
    assert steps == sorted(steps) and len([s for s in steps if s == 3]) <= 2  # no repeated rows after the resume
    bad = tmp_path / "nan"
    assert main(flags(tiny, bad, "--steps", "6", "--lr", "1e30", "--grad-clip", "1e30", "--warmup", "0")) == 2
    assert "non-finite loss" in capsys.readouterr().err and not (bad / "indexer").exists()


def _write_st(path, header: dict | list, data: bytes):
    import json
    import struct

    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("case,match", [
    ("alias", "overlaps or aliases"), ("overlap", "overlaps or aliases"), ("negative", "data_offsets"),
    ("gap", "leaves a gap"), ("list_header", "JSON object"), ("no_offsets", "data_offsets"),
    ("leftover", "cover 32 of the 48"), ("int_weight", "floating point"),
])
def test_safetensors_header_is_not_trusted(tmp_path, case, match):
    """Headers the official library rejects are rejected here too, naming the file and tensor."""
    from convert.errors import ConversionError
    from convert.readers import read_tensors

    data = np.arange(8, dtype=np.float32).tobytes() * 2  # 64 bytes
    a = {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]}
    b = {"dtype": "F32", "shape": [2, 4], "data_offsets": [32, 64]}
    header = {"x.weight": a, "y.weight": b}
    if case == "alias":
        header["y.weight"] = dict(b, data_offsets=[0, 32])
        data = data[:32]
    elif case == "overlap":
        header["y.weight"] = dict(b, shape=[2, 4], data_offsets=[16, 48])
        data = data[:48]
    elif case == "negative":
        header["x.weight"] = dict(a, data_offsets=[-32, 0])
    elif case == "gap":
        header["y.weight"] = dict(b, shape=[1, 4], data_offsets=[48, 64])
    elif case == "list_header":
        header = [a, b]
    elif case == "no_offsets":
        header["x.weight"] = {"dtype": "F32", "shape": [2, 4]}
    elif case == "leftover":
        header = {"x.weight": a}
        data = data[:48]
    elif case == "int_weight":
        header["x.weight"] = dict(a, dtype="I32")
    d = tmp_path / "m"
    d.mkdir()
    _write_st(d / "model.safetensors", header, data)
    with pytest.raises(ConversionError, match=match):
        read_tensors(str(d))


def test_sharded_tensor_must_be_where_the_index_says(tmp_path):
    import json

    from convert.errors import ConversionError
    from convert.readers import read_tensors

    t = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
    data = np.ones(4, np.float32).tobytes()
    _write_st(tmp_path / "s1.safetensors", {"a.weight": t}, data)
    _write_st(tmp_path / "s2.safetensors", {"b.weight": t}, data)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a.weight": "s2.safetensors", "b.weight": "s1.safetensors"}}))
    with pytest.raises(ConversionError, match="index lists this tensor in 's2.safetensors'"):
        read_tensors(str(tmp_path))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a.weight": "s1.safetensors", "b.weight": "s2.safetensors", "c.weight": "s2.safetensors"}}))
    with pytest.raises(ConversionError, match="in no shard"):
        read_tensors(str(tmp_path))


def test_float16_overflow_is_refused(src, tmp_path):
    from convert.errors import ConversionError
    from convert.load import load_source
    from safetensors.numpy import load_file, save_file

    big = tmp_path / "big"
    shutil.copytree(src, big)
    st = load_file(str(big / "model.safetensors"))
    name = next(k for k in st if k.endswith("q_proj.weight"))
    st[name] = st[name].copy()
    st[name][0, 0] = 1e6  # fine in float32 and bfloat16, inf in float16
    save_file(st, str(big / "model.safetensors"), metadata={"format": "pt"})
    load_source(str(big), dtype="bfloat16")
    with pytest.raises(ConversionError, match="float16"):
        load_source(str(big), dtype="float16")


def test_kernel_apis_validate_plans_and_inputs():
    """Out-of-range block ids (also -1), counts past M, kv_len past S and integer inputs are refused outside jit
    (the reference and the kernels once disagreed on them); a decode backend of another op is refused."""
    from pallas_kernels.block_plan import band_selection, plan_from_selection
    from pallas_kernels.sparse_attention.api import block_sparse_attention
    from pallas_kernels.sparse_decode.api import sparse_decode_attention
    from pallas_kernels.sparse_decode.plan import decode_plan

    rng = np.random.default_rng(0)
    b, t, n, kh, h = 1, 32, 2, 1, 8
    q = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, t, kh, h)), jnp.float32)
    sel = jnp.asarray(band_selection(1, t, t, sinks=0, window=t, q_block=8, kv_block=8))
    plan = plan_from_selection(jnp.broadcast_to(sel, (b, n) + sel.shape[1:]), sinks=0, window=t, kv_len=t,
                               q_block=8, kv_block=8)
    block_sparse_attention(q, k, k, plan, backend="reference")  # the valid plan runs
    for bad, match in ((dataclasses.replace(plan, kv_blocks=plan.kv_blocks.at[0, 0, 3, 0].set(4)), "block ids"),
                       (dataclasses.replace(plan, kv_blocks=plan.kv_blocks.at[0, 1, 2, 0].set(-1)), "block ids"),
                       (dataclasses.replace(plan, counts=plan.counts.at[0, 0, 0].set(5)), "counts"),
                       (dataclasses.replace(plan, kv_len=plan.kv_len + 1), "kv_len")):
        with pytest.raises(ValueError, match=match):
            block_sparse_attention(q, k, k, bad, backend="reference")
    with pytest.raises(ValueError, match="floating-point"):
        block_sparse_attention(q.astype(jnp.int32), k, k, plan, backend="reference")
    dp = decode_plan(jnp.ones((b, n, 4), bool), kh, sinks=jnp.zeros(n, jnp.int32), window=jnp.full(n, t, jnp.int32),
                     kv_len=jnp.asarray([t]), kv_block=8)
    sparse_decode_attention(q[:, 0], k, k, dp, backend="reference")
    with pytest.raises(ValueError, match="block ids"):
        sparse_decode_attention(q[:, 0], k, k, dataclasses.replace(dp, kv_blocks=dp.kv_blocks.at[0, 0, 0].set(9)),
                                backend="reference")
    with pytest.raises(ValueError, match="backend must be one of"):
        sparse_decode_attention(q[:, 0], k, k, dp, backend="mosaic_gpu", interpret=True)
    # a concrete plan captured by the caller's jit is part of that trace: no host check there (it once raised
    # a ConcretizationTypeError), and the result is the eager one
    eager = sparse_decode_attention(q[:, 0], k, k, dp, backend="reference")[0]
    inside = jax.jit(lambda q: sparse_decode_attention(q, k, k, dp, backend="reference")[0])(q[:, 0])
    np.testing.assert_allclose(np.asarray(inside), np.asarray(eager), rtol=1e-6, atol=1e-6)
    jax.jit(lambda q: block_sparse_attention(q, k, k, plan, backend="reference"))(q)


def test_convert_refuses_window_zero(src, tmp_path, capsys):
    assert convert_main(["--model", src, "--out", str(tmp_path / "w0"), "--window", "0"]) == 2
    assert "--window must be >= 1" in capsys.readouterr().err and not (tmp_path / "w0").exists()


def test_checkpoints_written_on_other_hardware_load_here(tmp_path):
    """An indexer / converted model written with arrays sharded over 8 devices (say a GPU host) loads in a process
    with one device (say a CPU): restores name the local device instead of trusting the saved topology."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    write = f"""
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from rtpurbo_jax.checkpoint import save_converted, write_params
from rtpurbo_jax.params import init_params
from tests.test_calibrate import CFG
mesh = Mesh(np.asarray(jax.devices()), ("d",))
put = lambda x: jax.device_put(x, NamedSharding(mesh, P(*([None] * (x.ndim - 1)), "d") if x.shape[-1] % 8 == 0 else P()))
l, n, h = CFG.num_layers, CFG.num_heads, CFG.head_dim
write_params({str(tmp_path / "ix")!r}, {{k: put(jax.random.normal(jax.random.key(1), (l, n, h, 8))) for k in ("w_q", "w_k")}})
save_converted({str(tmp_path / "conv")!r}, jax.tree.map(put, init_params(CFG, jax.random.key(0))), CFG)
"""
    read = f"""
import jax
from rtpurbo_jax.checkpoint import load_converted, load_indexer
c = load_converted({str(tmp_path / "conv")!r})
ix = load_indexer({str(tmp_path / "ix")!r}, c.model_config, 8)
assert load_indexer({str(tmp_path / "ix")!r}, c.model_config)["w_k"].shape[-1] == 8  # its own index_dim
assert jax.device_count() == 1 and ix["w_q"].shape[-1] == 8 and float(abs(ix["w_q"]).sum()) > 0
print("ok", len(jax.tree.leaves(c.params)))
"""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": root}
    for code, devices in ((write, 8), (read, 1)):
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
        r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("ok")
