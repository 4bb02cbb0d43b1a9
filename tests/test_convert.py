"""Converter: round trip, the bundled SmolLM2 against transformers' GGUF loader, and clear bad-input errors."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert import ConversionError, load_source
from convert.__main__ import convert, main
from convert.gguf_reader import unpermute_rows
from rtpurbo_jax.checkpoint import CheckpointError, load_converted
from rtpurbo_jax.model import forward
from tests.conftest import assert_logits_close, build_hf_model, greedy_full, save_hf, torch_logits


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    model = build_hf_model("llama")
    return model, save_hf(model, str(tmp_path_factory.mktemp("hf") / "llama"), "safetensors")


def test_round_trip_convert_reload_same_logits(tmp_path, llama_dir):
    model, path = llama_dir
    out = convert(path, str(tmp_path / "out"), log=lambda *_: None)
    loaded = load_converted(out)
    tokens = np.random.default_rng(0).integers(0, 256, size=(1, 24))
    assert_logits_close(forward(loaded.params, jnp.asarray(tokens), loaded.model_config), torch_logits(model, tokens))
    assert loaded.meta["model_config"]["model_type"] == "llama"
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_existing_output_is_not_overwritten(tmp_path, llama_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("user data")
    assert main(["--model", llama_dir[1], "--out", str(out)]) == 2
    assert main(["--model", llama_dir[1], "--out", str(out), "--overwrite"]) == 2  # not a converted output
    assert (out / "mine.txt").read_text() == "user data"
    convert(llama_dir[1], str(tmp_path / "conv"), log=lambda *_: None)
    convert(llama_dir[1], str(tmp_path / "conv"), overwrite=True, log=lambda *_: None)  # an earlier output: fine
    assert (tmp_path / "conv" / "rtpurbo.json").exists() and not [f for f in os.listdir(tmp_path) if ".old" in f]


def test_bf16_conversion_keeps_dtype(tmp_path, llama_dir):
    out = convert(llama_dir[1], str(tmp_path / "o"), dtype="bfloat16", log=lambda *_: None)
    loaded = load_converted(out)
    assert {x.dtype for x in jax.tree.leaves(loaded.params)} == {jnp.dtype(jnp.bfloat16)}


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_missing_shard(tmp_path):
    path = save_hf(build_hf_model("qwen2"), str(tmp_path / "m"), "sharded")
    shard = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))[1]
    os.remove(os.path.join(path, shard))
    with pytest.raises(ConversionError, match="missing") as e:
        load_source(path)
    assert shard in str(e.value)


def test_truncated_safetensors(tmp_path, llama_dir):
    path = _copy(os.path.dirname(llama_dir[1] + "/"), tmp_path / "m")
    f = os.path.join(path, "model.safetensors")
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
        fh.truncate(size - 1000)
    with pytest.raises(ConversionError, match="truncated") as e:
        load_source(path)
    assert "model.safetensors" in str(e.value) and "tensor" in str(e.value)


def test_corrupt_safetensors_header(tmp_path, llama_dir):
    path = _copy(llama_dir[1], tmp_path / "m")
    f = os.path.join(path, "model.safetensors")
    with open(f, "r+b") as fh:
        fh.seek(8)
        fh.write(b"\xff\xfe garbage")
    with pytest.raises(ConversionError, match="corrupt"):
        load_source(path)


def _copy_with_config(src, dst, **changes) -> str:
    """A copy of checkpoint `src` whose config.json has `changes`."""
    path = _copy(src, dst)
    cfg_path = os.path.join(path, "config.json")
    json.dump({**json.load(open(cfg_path)), **changes}, open(cfg_path, "w"))
    return path


def test_unknown_model_type(tmp_path, llama_dir):
    path = _copy_with_config(llama_dir[1], tmp_path / "m", model_type="gpt_neox")
    with pytest.raises(ConversionError, match="gpt_neox.*not supported"):
        load_source(path)


def test_shape_mismatch_names_tensor(tmp_path, llama_dir):
    path = _copy_with_config(llama_dir[1], tmp_path / "m", intermediate_size=96)
    with pytest.raises(ConversionError, match=r"mlp\.\w+_proj\.weight") as e:
        load_source(path)
    assert "96" in str(e.value)


def test_missing_weight_names_tensor(tmp_path):
    import torch

    model = build_hf_model("llama")
    path = str(tmp_path / "m")
    model.config.save_pretrained(path)
    state = {k: v for k, v in model.state_dict().items() if k != "model.layers.1.mlp.up_proj.weight"}
    torch.save(state, os.path.join(path, "pytorch_model.bin"))
    with pytest.raises(ConversionError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_source(path)


def test_foreign_or_corrupt_converted_checkpoint(tmp_path, llama_dir):
    with pytest.raises(CheckpointError, match="rtpurbo.json is missing"):
        load_converted(llama_dir[1])
    out = convert(llama_dir[1], str(tmp_path / "o"), log=lambda *_: None)
    for root, _, files in os.walk(os.path.join(out, "params")):
        for f in files:
            if os.path.getsize(os.path.join(root, f)) > 1000:
                open(os.path.join(root, f), "wb").write(b"corrupt")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_converted(out)


def test_unpermute_inverts_llama_cpp_permutation():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3 * 8, 5))
    n_head = 3
    permuted = w.reshape(n_head, 2, 4, 5).swapaxes(1, 2).reshape(w.shape)  # llama.cpp's convert script
    np.testing.assert_array_equal(unpermute_rows(permuted, n_head), w)


def test_unsupported_gguf_quantization(tmp_path):
    import gguf

    path = str(tmp_path / "q.gguf")
    w = gguf.GGUFWriter(path, "llama")
    for k, v in dict(block_count=1, context_length=64, embedding_length=32, feed_forward_length=64).items():
        getattr(w, f"add_{k}")(v)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tensor("token_embd.weight", np.ones((16, 292), np.uint8), raw_shape=(16, 292),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_K)  # Q8_K: no numpy de-quantizer in gguf
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConversionError, match="Q8_K.*not supported") as e:
        load_source(path)
    assert "token_embd.weight" in str(e.value)


def _tiny_gguf(path: str, *, kv_heads: int | None, heads: int | None = 2) -> dict:
    """A 1-layer fp32 llama GGUF (D=8, 2 heads of 4, vocab 16); head_count / head_count_kv only when given.
    Returns the HF-layout q / k weights it encodes (llama.cpp's permuted rows are written)."""
    import gguf

    rng = np.random.default_rng(0)
    d, hd, v, f = 8, 4, 16, 12
    kvh = kv_heads or heads or 2
    w = gguf.GGUFWriter(path, "llama")
    for k, val in dict(block_count=1, context_length=64, embedding_length=d, feed_forward_length=f).items():
        getattr(w, f"add_{k}")(val)
    if heads is not None:
        w.add_head_count(heads)
    if kv_heads is not None:
        w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    permute = lambda x, n: x.reshape(n, 2, x.shape[0] // n // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)
    hf = {"q": rng.normal(size=(2 * hd, d)).astype(np.float32), "k": rng.normal(size=(kvh * hd, d)).astype(np.float32)}
    tensors = {"token_embd.weight": (v, d), "output_norm.weight": (d,), "blk.0.attn_norm.weight": (d,),
               "blk.0.attn_v.weight": (kvh * hd, d), "blk.0.attn_output.weight": (d, 2 * hd),
               "blk.0.ffn_norm.weight": (d,), "blk.0.ffn_gate.weight": (f, d), "blk.0.ffn_up.weight": (f, d),
               "blk.0.ffn_down.weight": (d, f)}
    for name, shape in tensors.items():
        w.add_tensor(name, rng.normal(size=shape).astype(np.float32))
    w.add_tensor("blk.0.attn_q.weight", permute(hf["q"], 2))
    w.add_tensor("blk.0.attn_k.weight", permute(hf["k"], kvh))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def test_gguf_without_head_count_kv_has_no_gqa(tmp_path):
    """head_count_kv absent = as many KV heads as query heads (the GGUF spec's default), k un-permuted with it;
    head_count absent is a clear error."""
    path = str(tmp_path / "mha.gguf")
    hf = _tiny_gguf(path, kv_heads=None)
    cfg, params, tokenizer = load_source(path)
    assert cfg.num_heads == cfg.num_kv_heads == 2 and tokenizer is None  # the file holds no tokenizer
    np.testing.assert_allclose(np.asarray(params["layers"]["wk"][0]), hf["k"].T, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(params["layers"]["wq"][0]), hf["q"].T, rtol=1e-6)
    gqa = str(tmp_path / "gqa.gguf")
    _tiny_gguf(gqa, kv_heads=1)
    assert load_source(gqa)[0].num_kv_heads == 1
    bad = str(tmp_path / "nohead.gguf")
    _tiny_gguf(bad, kv_heads=None, heads=None)
    with pytest.raises(ConversionError, match="lacks llama.attention.head_count"):
        load_source(bad)


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers_and_greedy(smollm2, smollm2_path, monkeypatch):
    import functools

    import gguf
    import torch
    import transformers as tf

    # transformers rebuilds gguf's tensor-name map once per tensor (~7 of this test's seconds; the GGUF parses are
    # shared by conftest): a pure function of its arguments, so memoise it here
    monkeypatch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map))
    cfg, params, tok = smollm2
    hf = tf.AutoModelForCausalLM.from_pretrained(os.path.dirname(smollm2_path),
                                                 gguf_file=os.path.basename(smollm2_path), dtype=torch.float32).eval()
    text = "In the beginning God created the heaven and the earth. And the earth was without form, and void; " * 3
    ids = tok(text, return_tensors="np")["input_ids"][:, :64]
    assert ids.shape == (1, 64)
    assert_logits_close(forward(params, jnp.asarray(ids), cfg), torch_logits(hf, ids))
    # 16 greedy tokens, recomputing the full forward each step (no cache yet) for both.
    with torch.no_grad():
        ref = hf.generate(torch.as_tensor(ids), max_new_tokens=16, do_sample=False).numpy()[0, 64:]
    ours = greedy_full(lambda p, t: forward(p, t, cfg), params, ids, 16)
    np.testing.assert_array_equal(ours[0], ref)
