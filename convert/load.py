"""Load a source checkpoint (HF directory or GGUF file) into (ModelConfig, params pytree, tokenizer)."""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np

from convert import families
from convert.errors import ConversionError
from convert.gguf_reader import gguf_tokenizer, read_gguf
from convert.readers import read_tensors
from rtpurbo_jax.model_config import ModelConfig, UnsupportedModelError, from_hf

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def _resolve_dtype(name: str, tensors: dict) -> np.dtype:
    if name != "auto":
        return np.dtype(DTYPES[name])
    kinds = {a.dtype for a in tensors.values() if a.dtype.kind == "f" or a.dtype == ml_dtypes.bfloat16}
    return np.dtype(kinds.pop()) if len(kinds) == 1 else np.dtype(np.float32)


def _hf_tokenizer(model_dir: str):
    if not any(f.startswith("tokenizer") for f in os.listdir(model_dir)):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def load_source(path: str, dtype: str = "auto") -> tuple[ModelConfig, dict, object]:
    """(config, numpy params pytree, tokenizer or None) from a HF checkpoint dir or a .gguf file.

    dtype: auto (the source's float dtype; float32 for GGUF) | float32 | bfloat16 | float16.
    Raises ConversionError naming the file (and tensor) for anything unreadable or inconsistent.
    """
    if not os.path.exists(path):
        raise ConversionError("model path does not exist", file=path)
    if os.path.isfile(path) and path.endswith(".gguf"):
        raw_cfg, tensors, has_tokenizer = read_gguf(path)
        tokenizer = gguf_tokenizer(path, has_tokenizer)
    elif os.path.isdir(path):
        cfg_path = os.path.join(path, "config.json")
        if not os.path.exists(cfg_path):
            raise ConversionError("config.json is missing", file=cfg_path)
        try:
            with open(cfg_path) as f:
                raw_cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ConversionError(f"config.json is not valid JSON ({e})", file=cfg_path) from e
        tensors = read_tensors(path)
        tokenizer = _hf_tokenizer(path)
    else:
        raise ConversionError("expected a checkpoint directory or a .gguf file", file=path)
    try:
        cfg = from_hf(raw_cfg)
    except UnsupportedModelError as e:
        raise ConversionError(str(e), file=path) from e
    target = _resolve_dtype(dtype, tensors)
    params = families.for_model_type(cfg.model_type).to_params(tensors, cfg, target, path)
    _check_finite(params, target, path)
    return cfg, params, tokenizer


def _check_finite(params: dict, dtype: np.dtype, path: str) -> None:
    """Refuse non-finite weights (e.g. values past float16's 65504 that became inf in the cast)."""
    import jax

    for keypath, leaf in jax.tree_util.tree_leaves_with_path(params):
        a = np.asarray(leaf)
        if a.dtype.kind in "fV" or a.dtype == ml_dtypes.bfloat16:
            if not np.isfinite(a.astype(np.float32)).all():
                hint = " (values beyond float16's range: use --dtype bfloat16 or float32)" if dtype == np.float16 else ""
                raise ConversionError(f"weights hold inf or NaN after conversion to {dtype}{hint}", file=path,
                                      tensor=jax.tree_util.keystr(keypath))
