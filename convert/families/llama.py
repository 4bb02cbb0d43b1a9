"""Llama-layout families (llama, mistral, qwen2, qwen3): HF tensor names -> the params pytree.

All four share transformers' `model.layers.{i}.self_attn.*` / `mlp.*` names; Qwen2 adds q/k/v biases, Qwen3
per-head q/k norms. HF safetensors use the half-split RoPE layout, so no row permutation is needed here
(GGUF's llama.cpp permutation is undone in `convert.gguf_reader`). Matrices are transposed to [in, out].
"""

from __future__ import annotations

import re

import numpy as np

from convert.errors import ConversionError
from rtpurbo_jax.model_config import ModelConfig
from rtpurbo_jax.params import ParamSpec, param_specs

# HF per-layer suffix -> (our name, transpose)
LAYER_MAP = {
    "input_layernorm.weight": ("attn_norm", False),
    "self_attn.q_proj.weight": ("wq", True),
    "self_attn.k_proj.weight": ("wk", True),
    "self_attn.v_proj.weight": ("wv", True),
    "self_attn.o_proj.weight": ("wo", True),
    "self_attn.q_proj.bias": ("bq", False),
    "self_attn.k_proj.bias": ("bk", False),
    "self_attn.v_proj.bias": ("bv", False),
    "self_attn.o_proj.bias": ("bo", False),
    "self_attn.q_norm.weight": ("q_norm", False),
    "self_attn.k_norm.weight": ("k_norm", False),
    "post_attention_layernorm.weight": ("mlp_norm", False),
    "mlp.gate_proj.weight": ("w_gate", True),
    "mlp.up_proj.weight": ("w_up", True),
    "mlp.down_proj.weight": ("w_down", True),
}
TOP_MAP = {"model.embed_tokens.weight": ("embed", False), "model.norm.weight": ("final_norm", False),
           "lm_head.weight": ("lm_head", True)}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


def _check(name: str, arr: np.ndarray, want: tuple[int, ...], file: str | None):
    if tuple(arr.shape) != want:
        raise ConversionError(f"shape {tuple(arr.shape)} disagrees with the config, which needs {want}",
                              file=file, tensor=name)


def to_params(tensors: dict[str, np.ndarray], cfg: ModelConfig, dtype, source: str | None = None) -> dict:
    """Map HF-named numpy tensors into the stacked params pytree (numpy, `dtype`).

    Raises ConversionError naming the tensor for a missing weight, an unexpected one, or a wrong shape.
    """
    specs = param_specs(cfg)
    layer_specs: dict[str, ParamSpec] = specs["layers"]
    stacks = {k: [None] * cfg.num_layers for k in layer_specs}
    top: dict[str, np.ndarray] = {}
    for name, arr in tensors.items():
        if _IGNORED.search(name):
            continue
        m = _LAYER_RE.match(name)
        if m:
            i, suffix = int(m.group(1)), m.group(2)
            if suffix not in LAYER_MAP or i >= cfg.num_layers:
                raise ConversionError("unexpected tensor for this config", file=source, tensor=name)
            ours, tr = LAYER_MAP[suffix]
            if ours not in layer_specs:
                raise ConversionError(f"tensor present but the config does not use {ours!r}", file=source, tensor=name)
            a = arr.T if tr else arr
            _check(name, a, layer_specs[ours].shape[1:], source)
            stacks[ours][i] = np.asarray(a, dtype=dtype)
        elif name in TOP_MAP:
            ours, tr = TOP_MAP[name]
            if ours == "lm_head" and cfg.tie_word_embeddings:
                continue  # tied: the embedding serves as the output matrix
            a = arr.T if tr else arr
            _check(name, a, specs[ours].shape, source)
            top[ours] = np.asarray(a, dtype=dtype)
        else:
            raise ConversionError("unexpected tensor for a llama-family checkpoint", file=source, tensor=name)
    layers = {}
    for ours, items in stacks.items():
        missing = [i for i, a in enumerate(items) if a is None]
        if missing:
            hf = next(k for k, v in LAYER_MAP.items() if v[0] == ours)
            raise ConversionError(f"missing weight in {len(missing)} layer(s)", file=source,
                                  tensor=f"model.layers.{missing[0]}.{hf}")
        layers[ours] = np.stack(items)
    for ours in specs:
        if ours != "layers" and ours not in top:
            hf = next(k for k, v in TOP_MAP.items() if v[0] == ours)
            raise ConversionError("missing weight", file=source, tensor=hf)
    return {**top, "layers": layers}
