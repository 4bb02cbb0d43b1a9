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
    if not isinstance(header, dict):
        raise ConversionError(f"safetensors header must be a JSON object, got {type(header).__name__}", file=path)
    header.pop("__metadata__", None)
    _check_layout(header, size - 8 - n, path)
    return header, 8 + n


def _check_layout(header: dict, data_bytes: int, path: str) -> None:
    """What the official library checks: every entry has dtype / shape / data_offsets, and the tensors tile the
    data buffer exactly — in bounds, contiguous, no overlap, no alias, nothing left over."""
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise ConversionError("header entry needs dtype, shape and data_offsets", file=path, tensor=name)
        off, shape = info["data_offsets"], info["shape"]
        if (not isinstance(off, list) or len(off) != 2 or not all(isinstance(x, int) for x in off)
                or not 0 <= off[0] <= off[1]):
            raise ConversionError(f"data_offsets {off!r} must be two integers 0 <= begin <= end", file=path, tensor=name)
        if not isinstance(shape, list) or not all(isinstance(x, int) and x >= 0 for x in shape):
            raise ConversionError(f"shape {shape!r} must be a list of integers >= 0", file=path, tensor=name)
        spans.append((off[0], off[1], name))
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            what = "overlaps or aliases another tensor" if begin < pos else f"leaves a gap at byte {pos}"
            raise ConversionError(f"data_offsets [{begin}, {end}] {what}: the header is corrupt", file=path, tensor=name)
        pos = end
    if pos != data_bytes:
        raise ConversionError(f"tensors cover {pos} of the {data_bytes} data bytes: truncated or corrupt", file=path)


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


def _weight_map(model_dir: str) -> dict | None:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(model_dir, index_name)
        if os.path.exists(index):
            with open(index) as f:
                return json.load(f)["weight_map"]
    return None


def read_tensors(model_dir: str) -> dict[str, np.ndarray]:
    """All tensors of a HF checkpoint dir by name (safetensors memory-mapped; .bin loaded). Refuses a tensor
    found twice, a tensor in a shard its index does not list it in, and an index entry no shard holds; weights
    and biases must be floating point."""
    out: dict[str, np.ndarray] = {}
    weight_map = _weight_map(model_dir)
    for path in checkpoint_files(model_dir):
        it = iter_safetensors(path) if path.endswith(".safetensors") else _iter_bin(path)
        for name, arr in it:
            if name in out:
                raise ConversionError("tensor appears in more than one file", file=path, tensor=name)
            if weight_map is not None and weight_map.get(name) != os.path.basename(path):
                raise ConversionError(f"the index lists this tensor in {weight_map.get(name)!r}, not in this shard",
                                      file=path, tensor=name)
            if name.endswith((".weight", ".bias")) and not (arr.dtype.kind == "f" or arr.dtype == ml_dtypes.bfloat16):
                raise ConversionError(f"weights must be floating point, got {arr.dtype}", file=path, tensor=name)
            out[name] = arr
    if weight_map is not None and set(weight_map) - set(out):
        missing = sorted(set(weight_map) - set(out))
        raise ConversionError(f"{len(missing)} tensors of the index are in no shard (e.g. {missing[:3]})", file=model_dir)
    return out
