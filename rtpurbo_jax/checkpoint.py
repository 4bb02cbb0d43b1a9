"""Converted checkpoints: an Orbax params pytree + `rtpurbo.json` (model config, sparse config, roles) + tokenizer.

Layout of a converted directory:
    rtpurbo.json          {"format": "rtpurbo-jax", "version": 1, "model_config": {...}, "sparse_config": ...,
                           "param_dtype": ..., "source": ..., "extra": {...}}
    params/               Orbax StandardCheckpointer pytree (see `rtpurbo_jax.params`)
    tokenizer files       when the source had a tokenizer
Writes go to a temporary sibling directory renamed into place at the end: a failed run leaves nothing
half-written, and an existing output is never replaced unless `overwrite=True`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from rtpurbo_jax.model_config import ModelConfig

FORMAT, VERSION = "rtpurbo-jax", 1
META_FILE = "rtpurbo.json"


class CheckpointError(ValueError):
    """A converted checkpoint is missing, foreign, or corrupt; the message names the path."""


@dataclasses.dataclass
class Converted:
    params: dict
    model_config: ModelConfig
    meta: dict[str, Any]
    path: str

    @property
    def has_tokenizer(self) -> bool:
        """True when the checkpoint holds tokenizer files (a converted source without one has none)."""
        return any(f.startswith("tokenizer") for f in os.listdir(self.path))

    def tokenizer(self):
        from transformers import AutoTokenizer

        if not self.has_tokenizer:
            raise CheckpointError(f"{self.path} holds no tokenizer files")
        return AutoTokenizer.from_pretrained(self.path)


# what save_converted writes into a converted checkpoint (prefixes): anything else there is the user's
_OUR_FILES = ("params", "rtpurbo.json", "calibration.", "tokenizer", "special_tokens_map", "chat_template",
              "vocab.", "merges.", "added_tokens", "generation_config")


def check_replaceable(out_dir: str, protect: tuple[str, ...] = ()) -> None:
    """Raise unless `out_dir` may be replaced by a new converted checkpoint: it must be one of ours (it holds
    rtpurbo.json) and must not be, contain, or sit inside any path in `protect` (the source) or the working
    directory. Whatever a user made is never deleted by --overwrite."""
    out = os.path.realpath(out_dir)
    if not os.path.exists(out):
        return
    inside = lambda a, b: a == b or a.startswith(b.rstrip(os.sep) + os.sep)  # a is b or lies inside b
    for p in protect:
        rp = os.path.realpath(p)
        if inside(rp, out):
            raise FileExistsError(f"refusing to overwrite {out}: it is or holds the source {rp}")
    if inside(os.path.realpath(os.getcwd()), out):
        raise FileExistsError(f"refusing to overwrite {out}: it is or holds the current directory")
    if not os.path.isdir(out) or not os.path.exists(os.path.join(out, META_FILE)):
        raise FileExistsError(f"refusing to overwrite {out}: it is not a converted checkpoint (no {META_FILE}); "
                              "--overwrite only replaces an earlier output of python -m convert")
    foreign = sorted(f for f in os.listdir(out) if not f.startswith(_OUR_FILES))
    if foreign:
        raise FileExistsError(f"refusing to overwrite {out}: it holds files a conversion does not write "
                              f"({', '.join(foreign[:5])}); move them or choose another --out")


@contextlib.contextmanager
def atomic_dir(out_dir: str, overwrite: bool = False, protect: tuple[str, ...] = ()) -> Iterator[str]:
    """Yield a temporary directory that becomes `out_dir` only if the body finishes without error. With
    overwrite, an existing `out_dir` is replaced only if `check_replaceable(out_dir, protect)` allows it."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"output {out_dir} exists; pass --overwrite (overwrite=True) to replace it")
    check_replaceable(out_dir, protect)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    lead = jax.process_index() == 0
    if jax.process_count() > 1:  # one shared temporary directory, which the processes' collective Orbax save fills
        tmp = os.path.join(parent, os.path.basename(out_dir) + ".tmp-collective")
        if lead:
            shutil.rmtree(tmp, ignore_errors=True)  # ours: a crashed earlier collective write
            os.makedirs(tmp)
        sync("rtpurbo-atomic-dir-open")
    else:
        tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
    try:
        yield tmp
        sync("rtpurbo-atomic-dir-written")
        if lead and os.path.exists(out_dir):
            old = tmp + ".old"
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old)
        elif lead:
            os.rename(tmp, out_dir)
        sync("rtpurbo-atomic-dir-renamed")
    except BaseException:
        if lead:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def sync(name: str) -> None:
    """A barrier across processes (no-op with one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _here():
    """Where a restore puts arrays when the caller names no sharding: the first local device (replicated over
    every device in a multi-process run, where Orbax needs a global target). Naming it makes a checkpoint
    written on other hardware (say a GPU) load here (say on a CPU) instead of failing on the saved topology."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

    if jax.process_count() > 1:
        return NamedSharding(Mesh(np.asarray(jax.devices()), ("all",)), PartitionSpec())
    return SingleDeviceSharding(jax.local_devices()[0])


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def write_params(path: str, params: dict) -> None:
    """Save a params pytree with Orbax at `path` (must not exist; relative paths are fine); blocks until written."""
    ckpt = _checkpointer()
    ckpt.save(os.path.abspath(path), jax.tree.map(jnp.asarray, params))
    ckpt.wait_until_finished()
    ckpt.close()


def save_converted(out_dir: str, params: dict, cfg: ModelConfig, *, sparse_config: dict | None = None,
                   extra: dict | None = None, tokenizer=None, source: str | None = None,
                   overwrite: bool = False, write_extra_files=None) -> str:
    """Write a converted checkpoint atomically. `write_extra_files(tmp_dir)` may add reports before the rename.
    overwrite replaces only an earlier converted checkpoint, never `source` or a directory holding it."""
    dtypes = {str(np.asarray(x).dtype) if not hasattr(x, "dtype") else str(x.dtype) for x in jax.tree.leaves(params)}
    meta = {"format": FORMAT, "version": VERSION, "model_config": cfg.to_dict(), "sparse_config": sparse_config,
            "param_dtype": sorted(dtypes)[0] if len(dtypes) == 1 else sorted(dtypes), "source": source,
            "extra": extra or {}}
    with atomic_dir(out_dir, overwrite, protect=(source,) if source else ()) as tmp:
        write_params(os.path.join(tmp, "params"), params)  # collective with several processes (a shared disk)
        if jax.process_index() == 0:
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            if write_extra_files is not None:
                write_extra_files(tmp)
            with open(os.path.join(tmp, META_FILE), "w") as f:
                json.dump(meta, f, indent=2)
    return os.path.abspath(out_dir)


def model_name(meta: dict, path: str = "") -> str:
    """The model's short name (lower case) that results are labelled with: `extra["model_name"]` where a derived
    checkpoint (stage 2's export) carries its base model's, else the stem of `source` (the converted file or
    directory), else of `path`."""
    name = (meta.get("extra") or {}).get("model_name")
    return name or os.path.basename(os.path.normpath(meta.get("source") or path)).split(".")[0].lower()


def read_meta(path: str) -> dict:
    meta_path = os.path.join(path, META_FILE)
    if not os.path.exists(meta_path):
        raise CheckpointError(f"{path} is not a converted rtpurbo-jax checkpoint: {META_FILE} is missing "
                              "(run `python -m convert --model SRC --out DIR` first)")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_path} is corrupt: {e}") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def load_converted(path: str, dtype=None, shardings=None) -> Converted:
    """Load a converted checkpoint. dtype: cast params (default: as saved).

    shardings: optional pytree of `jax.sharding.Sharding` matching the params (e.g. `params.param_shardings`);
    each host then reads only its shards. In a multi-process run the default is replicated on every device
    (Orbax needs a global target there).
    """
    from rtpurbo_jax.params import abstract_params

    meta = read_meta(path)
    cfg = ModelConfig.from_dict(meta["model_config"])
    saved = meta.get("param_dtype")
    target = abstract_params(cfg, saved if isinstance(saved, str) else jnp.float32)
    if shardings is None:
        here = _here()
        shardings = jax.tree.map(lambda _: here, target)
    target = jax.tree.map(lambda t, s: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=s), target, shardings)
    try:
        params = _checkpointer().restore(os.path.join(os.path.abspath(path), "params"), target)
    except Exception as e:
        raise CheckpointError(f"params under {path} could not be restored ({type(e).__name__}: {e}); "
                              "the checkpoint is corrupt or was written for another config") from e
    if dtype is not None:
        params = jax.tree.map(lambda x: x.astype(dtype), params)
    return Converted(params=params, model_config=cfg, meta=meta, path=os.path.abspath(path))


def update_meta(path: str, **fields) -> None:
    """Atomically replace top-level fields of rtpurbo.json (e.g. roles after calibration)."""
    meta = read_meta(path)
    meta.update(fields)
    tmp = os.path.join(path, META_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp, os.path.join(path, META_FILE))


def load_indexer(path: str, cfg: ModelConfig, index_dim: int | None = None) -> dict:
    """Indexer weights written by `train.distill` (its run's `indexer/`): {w_q, w_k: fp32 [L, N, H, I]} and, when
    it was trained with one, the local prior {w_local: [L, N, H], b_local: [L, N]}. index_dim None: the I the
    indexer was saved with (`--index-dim` of its stage 1); an int must match it."""
    if not os.path.isdir(path):
        raise CheckpointError(f"no indexer at {path} (train.distill writes RUN_DIR/indexer when it finishes)")
    l, n, h = cfg.num_layers, cfg.num_heads, cfg.head_dim
    if index_dim is None:
        try:
            index_dim = int(_checkpointer().metadata(os.path.abspath(path)).item_metadata.tree["w_q"].shape[-1])
        except Exception as e:  # noqa: BLE001 - any unreadable metadata is the same error to the user
            raise CheckpointError(f"indexer under {path} has no readable w_q metadata ({type(e).__name__}: {e}); "
                                  "it is corrupt or not an indexer") from e
    shape = (l, n, h, index_dim)
    here = _here()
    at = lambda s: jax.ShapeDtypeStruct(s, jnp.float32, sharding=here)
    maps = {k: at(shape) for k in ("w_q", "w_k")}
    prior = {"w_local": at((l, n, h)), "b_local": at((l, n))}
    errors = []
    for target in ({**maps, **prior}, maps):  # with the local prior, then without (indexers trained before it)
        try:
            return _checkpointer().restore(os.path.abspath(path), target)
        except Exception as e:  # noqa: BLE001 - reported below with both attempts
            errors.append(f"{type(e).__name__}: {e}")
    raise CheckpointError(f"indexer under {path} could not be restored as {shape} ({errors[-1]}); it is corrupt or "
                          "belongs to another model / index_dim")
