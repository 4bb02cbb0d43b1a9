"""ModelConfig: the Llama / Qwen2 / Qwen3 / Mistral family as one frozen, hashable dataclass.

Built from a transformers config (`from_hf`, reading both v5 `rope_parameters` and the legacy `rope_theta` /
`rope_scaling`), from GGUF metadata (`convert.gguf_reader`), or by hand (`LLAMA3_8B`, shrunk in tests with
`dataclasses.replace`). JSON round-trip through `to_dict` / `from_dict`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or one of its options is not implemented; the message names which."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """RoPE settings. `rope_type`: default | llama3 | linear; `factor` etc. only for the scaled types."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 always; Llama with attention_bias
    o_bias: bool = False  # Llama with attention_bias
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    sliding_window: int | None = None  # honoured in full mode (Mistral-style window over every head)
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {self.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        if self.rope.rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope type {self.rope.rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(f"num_heads {self.num_heads} not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise UnsupportedModelError(f"head_dim {self.head_dim} must be even for RoPE")

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def eos_tokens(self) -> tuple[int, ...]:
        """The end-of-sequence ids as a tuple (empty when the model names none): `generate`'s stop tokens."""
        e = self.eos_token_id
        return () if e is None else tuple(e) if isinstance(e, tuple) else (int(e),)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if isinstance(self.eos_token_id, tuple):
            d["eos_token_id"] = list(self.eos_token_id)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        d["rope"] = RopeConfig(**d.get("rope", {}))
        if isinstance(d.get("eos_token_id"), list):
            d["eos_token_id"] = tuple(d["eos_token_id"])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _rope_from_hf(hf: dict[str, Any]) -> RopeConfig:
    params = hf.get("rope_parameters") or {}
    legacy = hf.get("rope_scaling") or {}
    if isinstance(params, dict) and params and not ("rope_type" in params or "rope_theta" in params):
        raise UnsupportedModelError("per-layer-type rope_parameters are not supported")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = params if params.get("rope_type", "default") != "default" else legacy
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        return RopeConfig(theta=float(theta))
    return RopeConfig(
        theta=float(theta), rope_type=rope_type, factor=float(scaling.get("factor", 1.0)),
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(scaling.get("original_max_position_embeddings",
                                                          hf.get("max_position_embeddings", 8192))))


def _sliding_window(hf: dict[str, Any], model_type: str) -> int | None:
    win = hf.get("sliding_window")
    if not win:
        return None
    if model_type in ("qwen2", "qwen3"):
        if not hf.get("use_sliding_window", False):
            return None
        raise UnsupportedModelError(f"{model_type} with use_sliding_window=True (per-layer windows) is not supported")
    return int(win)


def from_hf(hf: dict[str, Any] | Any) -> ModelConfig:
    """ModelConfig from a transformers config object or its `config.json` dict (v4 or v5 layout)."""
    if not isinstance(hf, dict):
        hf = hf.to_dict()
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if hf.get("mlp_bias"):
        raise UnsupportedModelError("mlp_bias=True is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"hidden_act {hf.get('hidden_act')!r} is not supported (only silu)")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    eos = hf.get("eos_token_id")
    attn_bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        model_type=model_type, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim,
        max_position_embeddings=hf.get("max_position_embeddings", 2048), rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope=_rope_from_hf(hf), tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or attn_bias, o_bias=model_type != "qwen2" and attn_bias,
        qk_norm=model_type == "qwen3", sliding_window=_sliding_window(hf, model_type),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=tuple(eos) if isinstance(eos, list) else eos)


LLAMA3_8B = ModelConfig(
    model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
    num_kv_heads=8, head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-5,
    rope=RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192))

QWEN3_8B = ModelConfig(
    model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=36, num_heads=32,
    num_kv_heads=8, head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6,
    rope=RopeConfig(theta=1000000.0), qk_norm=True)

SMOLLM2_135M = ModelConfig(
    model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
    num_kv_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5, rope=RopeConfig(theta=100000.0),
    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)

QWEN25_05B = ModelConfig(  # Qwen2.5(-Coder)-0.5B-Instruct: the shape of the long-context accuracy runs
    model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
    num_kv_heads=2, head_dim=64, max_position_embeddings=32768, rms_norm_eps=1e-6, rope=RopeConfig(theta=1000000.0),
    qkv_bias=True)
