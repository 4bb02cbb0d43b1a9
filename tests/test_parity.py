"""Logits parity with transformers' PyTorch models (float32): tiny models of each family, every file layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert import load_source
from rtpurbo_jax.model import forward
from tests.conftest import assert_logits_close, build_hf_model, save_hf, torch_logits

CASES = [("llama", "safetensors"), ("llama", "bin"), ("llama", "sharded"), ("llama_linear", "safetensors"),
         ("qwen2", "safetensors"), ("qwen2", "bin"), ("qwen3", "safetensors"), ("qwen3", "sharded"),
         ("mistral", "safetensors"), ("mistral", "bin")]


@pytest.mark.parametrize("family,how", CASES)
def test_logits_match_transformers(tmp_path, family, how):
    model = build_hf_model(family)
    path = save_hf(model, str(tmp_path / family), how)
    cfg, params, _ = load_source(path, dtype="float32")
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(2, 40))  # 40 > mistral's window 16
    ours = forward(jax.tree.map(jnp.asarray, params), jnp.asarray(tokens), cfg, chunk=16)
    assert_logits_close(ours, torch_logits(model, tokens))


def test_config_fields_per_family():
    from rtpurbo_jax.model_config import from_hf
    from tests.conftest import tiny_hf_config

    assert from_hf(tiny_hf_config("qwen2")).qkv_bias and not from_hf(tiny_hf_config("qwen2")).o_bias
    assert from_hf(tiny_hf_config("qwen3")).qk_norm and from_hf(tiny_hf_config("qwen3")).head_dim == 32
    assert from_hf(tiny_hf_config("llama")).rope.rope_type == "llama3"
    assert from_hf(tiny_hf_config("mistral")).sliding_window == 16
    legacy = tiny_hf_config("llama").to_dict()
    legacy.pop("rope_parameters")
    legacy.update(rope_theta=5000.0, rope_scaling={"type": "linear", "factor": 4.0})
    r = from_hf(legacy).rope
    assert (r.rope_type, r.theta, r.factor) == ("linear", 5000.0, 4.0)
