"""Read Hugging Face checkpoint tensors as numpy arrays, by name: safetensors (single or sharded) and PyTorch .bin.

Safetensors headers are parsed here (not through a framework) so that bfloat16 stays bfloat16 (ml_dtypes)
and a truncated or corrupt file fails with a `ConversionError` naming the file and the tensor.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterator

import ml_dtypes
import numpy as np

from convert.errors import ConversionError

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def _safetensors_header(path: str) -> tuple[dict, int]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ConversionError("file is too short to hold a safetensors header", file=path)
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise ConversionError(f"header length {n} runs past the end of the file ({size} bytes): corrupt",
                                  file=path)
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConversionError(f"safetensors header is not valid JSON ({e}): corrupt", file=path) from e
    header.pop("__metadata__", None)
    return header, 8 + n


def iter_safetensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) from one .safetensors file, memory-mapped, checking every tensor's byte range."""
    header, base = _safetensors_header(path)
    size = os.path.getsize(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    for name, info in header.items():
        dtype = _ST_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise ConversionError(f"unsupported safetensors dtype {info.get('dtype')!r}", file=path, tensor=name)
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        want = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if end - start != want:
            raise ConversionError(f"byte range {end - start} disagrees with shape {shape} {info['dtype']}",
                                  file=path, tensor=name)
        if base + end > size:
            raise ConversionError(f"tensor data ends at byte {base + end} but the file has {size} bytes: "
                                  "truncated", file=path, tensor=name)
        yield name, mm[base + start: base + end].view(dtype).reshape(shape)


def _iter_bin(path: str) -> Iterator[tuple[str, np.ndarray]]:
    try:
        import torch
    except ImportError as e:  # torch is only in the `dev` extra
        raise ConversionError("reading PyTorch .bin files needs torch (pip install -e '.[dev]')", file=path) from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConversionError(f"torch.load failed ({type(e).__name__}: {e})", file=path) from e
    for name, t in state.items():
        if t.dtype == torch.bfloat16:
            yield name, t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            yield name, t.numpy()


def checkpoint_files(model_dir: str) -> list[str]:
    """The weight files of a HF checkpoint dir: an index's shards, one safetensors, or PyTorch .bin files."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(model_dir, index_name)
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ConversionError(f"index has no valid weight_map ({e})", file=index) from e
            files = sorted(set(weight_map.values()))
            for shard in files:
                p = os.path.join(model_dir, shard)
                if not os.path.exists(p):
                    names = [k for k, v in weight_map.items() if v == shard][:3]
                    raise ConversionError(f"shard listed in the index is missing (holds {names}...)", file=p)
            return [os.path.join(model_dir, s) for s in files]
    for single in ("model.safetensors", "pytorch_model.bin"):
        p = os.path.join(model_dir, single)
        if os.path.exists(p):
            return [p]
    found = sorted(f for f in os.listdir(model_dir) if f.endswith((".safetensors", ".bin")))
    if found:
        return [os.path.join(model_dir, f) for f in found]
    raise ConversionError("no model.safetensors, sharded index, or pytorch_model.bin found", file=model_dir)


def read_tensors(model_dir: str) -> dict[str, np.ndarray]:
    """All tensors of a HF checkpoint dir by name (safetensors memory-mapped; .bin loaded)."""
    out: dict[str, np.ndarray] = {}
    for path in checkpoint_files(model_dir):
        it = iter_safetensors(path) if path.endswith(".safetensors") else _iter_bin(path)
        out.update(it)
    return out
