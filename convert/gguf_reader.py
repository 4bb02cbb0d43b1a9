"""GGUF files (llama.cpp) -> transformers-style config dict + HF-named float tensors + tokenizer.

Tensors are de-quantized with the `gguf` package (numpy). llama.cpp's converter permutes the rows of q and k
projections of llama/mistral models into an interleaved-pair RoPE layout; we undo it so the weights match
transformers' half-split layout (Qwen2/Qwen3 GGUFs are not permuted).
"""

from __future__ import annotations

import os

import numpy as np

from convert.errors import ConversionError

_ARCH_TO_MODEL_TYPE = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}
_NAME_MAP = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _hf_name(name: str) -> str | None:
    if name in _TOP:
        return _TOP[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _NAME_MAP:
        return f"model.layers.{parts[1]}.{_NAME_MAP[parts[2]]}.{parts[3]}"
    return None


def _embed_rows(reader) -> int:
    """Rows of token_embd.weight (the vocab size when the file states neither vocab_size nor its tokens)."""
    t = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    return 0 if t is None else int(t.shape[-1])


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: per head, interleaved (x0, y0, x1, y1, ...) -> halves (x..., y...)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path: str) -> tuple[dict, dict[str, np.ndarray], bool]:
    """(transformers-style config dict, HF-named float32 tensors, whether the file holds a tokenizer) from a
    GGUF file (the flag spares `gguf_tokenizer` a second parse of the header: seconds for a 49K-token vocab)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    try:
        reader = GGUFReader(path)
    except Exception as e:
        raise ConversionError(f"not a readable GGUF file ({type(e).__name__}: {e})", file=path) from e
    arch = _field(reader, "general.architecture")
    if arch not in _ARCH_TO_MODEL_TYPE:
        raise ConversionError(f"GGUF architecture {arch!r} is not supported; supported: "
                              f"{', '.join(_ARCH_TO_MODEL_TYPE)}", file=path)
    a = arch
    if _field(reader, f"{a}.attention.head_count") is None:
        raise ConversionError(f"GGUF metadata lacks {a}.attention.head_count", file=path)
    heads = int(_field(reader, f"{a}.attention.head_count"))
    kv_heads = int(_field(reader, f"{a}.attention.head_count_kv", heads))  # absent = no GQA (the GGUF spec's default)
    hidden = int(_field(reader, f"{a}.embedding_length"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    names = {t.name for t in reader.tensors}
    config = {
        "model_type": _ARCH_TO_MODEL_TYPE[arch], "hidden_size": hidden,
        "intermediate_size": int(_field(reader, f"{a}.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, f"{a}.block_count")), "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": int(_field(reader, f"{a}.attention.key_length", hidden // heads)),
        "max_position_embeddings": int(_field(reader, f"{a}.context_length")),
        "rms_norm_eps": float(_field(reader, f"{a}.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, f"{a}.rope.freq_base", 10000.0)),
        "vocab_size": int(_field(reader, f"{a}.vocab_size", len(tokens.data) if tokens else _embed_rows(reader))),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
    }
    if _field(reader, f"{a}.rope.scaling.type") not in (None, "none"):
        raise ConversionError(f"GGUF rope scaling {_field(reader, f'{a}.rope.scaling.type')!r} is not supported",
                              file=path)
    permuted = arch in ("llama", "mistral")
    tensors = {}
    for t in reader.tensors:
        hf = _hf_name(t.name)
        if hf is None:
            if t.name.startswith("rope_freqs"):
                raise ConversionError("GGUF with rope_freqs (llama3 scaling) is not supported", file=path,
                                      tensor=t.name)
            raise ConversionError("unexpected GGUF tensor", file=path, tensor=t.name)
        try:
            arr = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        except NotImplementedError as e:
            raise ConversionError(f"GGUF quantization {t.tensor_type.name} is not supported by the gguf package",
                                  file=path, tensor=t.name) from e
        arr = arr.reshape(tuple(int(d) for d in reversed(t.shape)))
        if permuted and hf.endswith("q_proj.weight"):
            arr = unpermute_rows(arr, heads)
        elif permuted and hf.endswith("k_proj.weight"):
            arr = unpermute_rows(arr, kv_heads)
        tensors[hf] = arr
    return config, tensors, _field(reader, "tokenizer.ggml.model") is not None


def gguf_tokenizer(path: str, present: bool | None = None):
    """The tokenizer stored inside a GGUF file, as a transformers tokenizer; None when the file holds none
    (no tokenizer.ggml.model field: calibration then uses random-token documents and says so). present: that
    field's presence when the caller has read the header already (`read_gguf`); None reads it here."""
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    if present is None:
        present = _field(GGUFReader(path), "tokenizer.ggml.model") is not None
    if not present:
        return None
    return AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path))
