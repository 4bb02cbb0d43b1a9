"""The hybrid RTPurbo KV cache: full K/V where a retrieval head needs it, sinks + a ring buffer elsewhere.

Per layer the KV heads split in two (static, from the roles):
- **full** KV heads (any of their query heads is a retrieval head) keep all `max_len` positions of K and V;
- **local** KV heads (all their query heads local) keep the first `sinks` positions plus a ring buffer of
  `ring` = min(local_span, max_len - sinks) slots (`SparseConfig.local_span`: the window, or the
  `seqlen_threshold` when larger, so that a short call can run every head dense): position p >= sinks lives
  in slot (p - sinks) mod ring, so the ring always holds the last `ring` non-sink positions — all a local head
  can see.
Each retrieval *query* head also keeps its index keys (`index_dim` values per position). Bytes therefore equal
`rtpurbo_jax.kv_memory.kv_cache_bytes` exactly (tested).

Layers are a tuple of per-layer buffers by default: their full/local splits differ, and stacking would pad every
layer to the widest one and give the savings back. With `scan=True` (`init_cache(..., scan=True)`) layers of
equal **head split** — the same numbers of full / local KV heads and the same retrieval heads per full KV head —
share one stacked buffer ([layers of the group, B, ...]; no padding, the same bytes), so that serving can scan
over layers and compile one layer body per split instead of one per layer (SmolLM2: 9 splits for 30 layers).
To make equal splits equal layouts, each layer's heads are listed in a canonical order: full KV heads by
descending retrieval count (then id), retrieval query heads in that KV order (ascending within a KV head),
local KV heads ascending; `LayerLayout.canonical` / `perms` map a layer onto its group's shared layout.
`scan="padded"` groups coarser — by the numbers of full / local KV heads only (SmolLM2: 4 groups) — and gives
every query head of a full KV head a **retrieval slot**: index keys are stored for all of them, and a slot whose
head is local in that layer (`LayerLayout.active`, traced per layer) plans as a local head (its band; the
planner's `active` argument). Same results, fewer compiled bodies; the cost is the phantom slots' index keys
(`cache_bytes` counts them; `HybridCache.layer(i)` returns the layer's real slots only).
`scan="uniform"` stacks **all** layers in one buffer and compiles one attention body: each layer's full KV heads
are padded to the widest layer's count by keeping some of its local KV heads whole (`LayerLayout.promote`: all
their query heads local, planned with their band over the full buffer), then padded as above. The cost is
memory: those heads keep every position instead of sinks + ring, and every query head of a full KV head keeps
index keys (SmolLM2 with its calibrated roles: every KV head full in some layer, so a dense cache plus index
keys). For short contexts and compile-bound use (`serving` docstring).

Axes: B batch, S = max_len, Kf / Kl full / local KV heads of a layer, R retrieval query heads, H head_dim,
I index_dim; ring slots are spelled `ring` (R is the retrieval heads' letter).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from rtpurbo_jax.kv_memory import kv_cache_bytes
from rtpurbo_jax.model_config import ModelConfig
from rtpurbo_jax.sparse_config import SparseConfig


SCAN_MODES = (False, True, "split", "padded", "uniform")


@dataclasses.dataclass(frozen=True)
class LayerLayout:
    """Static head split of one layer (ids ascending)."""

    full_kv: tuple[int, ...]  # KV heads with a full cache
    local_kv: tuple[int, ...]  # KV heads with sinks + ring
    retrieval_q: tuple[int, ...]  # retrieval query heads (they keep index keys)
    group: int  # query heads per KV head
    shared_keys: bool = False  # the retrieval heads of a KV head share one key map: one index key per KV head

    @property
    def index_heads(self) -> tuple[int, ...]:
        """The query heads whose index keys the cache stores: every retrieval head, or with `shared_keys` the first
        retrieval head of each full KV head that has any (its key map is the group's)."""
        if not self.shared_keys:
            return self.retrieval_q
        return tuple(r for i, r in enumerate(self.retrieval_q)
                     if i == 0 or self.retrieval_q[i - 1] // self.group != r // self.group)

    @property
    def index_rows(self) -> tuple[int, ...]:
        """Where each of `index_heads` sits in `retrieval_q` (the indexer rows whose key maps make the keys)."""
        return tuple(self.retrieval_q.index(h) for h in self.index_heads)

    @property
    def key_slot(self) -> tuple[int, ...] | None:
        """None (one index key per retrieval head), or with `shared_keys` the slot of `index_heads` each retrieval
        head reads (`pallas_kernels.indexer_topp.api`'s key_slot)."""
        if not self.shared_keys:
            return None
        kv = [h // self.group for h in self.index_heads]
        return tuple(kv.index(r // self.group) for r in self.retrieval_q)

    def q_heads(self, kv_heads: tuple[int, ...]) -> tuple[int, ...]:
        """Query heads served by `kv_heads`, in order."""
        return tuple(k * self.group + g for k in kv_heads for g in range(self.group))

    @classmethod
    def from_roles(cls, roles: np.ndarray, num_kv_heads: int, shared_keys: bool = False) -> "LayerLayout":
        """The canonical layout of one layer from its roles bool [N] (see the module docstring)."""
        g = roles.shape[0] // num_kv_heads
        count = roles.reshape(num_kv_heads, g).sum(-1)
        full = sorted(np.flatnonzero(count > 0).tolist(), key=lambda k: (-count[k], k))
        retrieval = tuple(k * g + j for k in full for j in range(g) if roles[k * g + j])
        return cls(tuple(full), tuple(np.flatnonzero(count == 0).tolist()), retrieval, g, shared_keys)

    @property
    def split(self) -> tuple:
        """Hashable head split: (full KV heads, local KV heads, retrieval heads per full KV head)."""
        counts = tuple(sum(1 for r in self.retrieval_q if r // self.group == k) for k in self.full_kv)
        return len(self.full_kv), len(self.local_kv), counts

    def canonical(self) -> "LayerLayout":
        """The layout every layer of this split shares once its heads are permuted by `perms`."""
        nf, nl, counts = self.split
        return LayerLayout(tuple(range(nf)), tuple(range(nf, nf + nl)),
                           tuple(j * self.group + i for j, c in enumerate(counts) for i in range(c)), self.group,
                           self.shared_keys)

    def promote(self, num_full: int) -> "LayerLayout":
        """This layer with its first local KV heads (ascending) kept whole until it has `num_full` full KV heads
        (`scan="uniform"`); their query heads stay local. Canonical order holds: they have no retrieval head."""
        extra = max(num_full - len(self.full_kv), 0)
        return dataclasses.replace(self, full_kv=self.full_kv + self.local_kv[:extra], local_kv=self.local_kv[extra:])

    def padded(self, always: bool = False) -> "LayerLayout":
        """The layout every layer of this layer's (full, local) KV counts shares with `scan="padded"`: the canonical
        KV heads, every query head of a full KV head in a retrieval slot (in `perms` order). A layer with no
        retrieval head keeps its canonical layout unless `always` (`scan="uniform"`: one layout for all layers)."""
        if not self.retrieval_q and not always:  # nothing to pad (a dense cache's layers, or only local KV heads)
            return self.canonical()
        nf, nl, _ = self.split
        # with shared_keys one index key per full KV head: its first slot's head, a retrieval head (`perms` puts
        # them first), so the padded slots add no index keys — except a KV head `promote` kept whole (uniform)
        return LayerLayout(tuple(range(nf)), tuple(range(nf, nf + nl)), tuple(range(nf * self.group)), self.group,
                           self.shared_keys)

    def active(self) -> np.ndarray:
        """bool [Kf * G]: which retrieval slots of `padded()` hold this layer's retrieval heads (the others are
        local heads planned with their band)."""
        counts = self.split[2]
        return np.asarray([j < c for c in counts for j in range(self.group)] if self.retrieval_q else [], bool)

    def perms(self) -> tuple[np.ndarray, np.ndarray]:
        """(q_perm int [N], kv_perm int [K]): head i of the canonical layout is head q_perm[i] (KV: kv_perm[i])
        of this layer; retrieval query heads first within each KV head."""
        kv = np.asarray(self.full_kv + self.local_kv, np.int32)
        q = [r for k in kv for r in sorted(range(k * self.group, (k + 1) * self.group),
                                              key=lambda n: (n not in self.retrieval_q, n))]
        return np.asarray(q, np.int32), kv


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """Static description of a hybrid cache (hashable: usable as a jit static argument)."""

    layers: tuple[LayerLayout, ...]
    max_len: int
    sinks: int  # sink slots stored: min(sinks, max_len)
    ring: int  # ring slots: min(local_span, max_len - sinks)
    window: int
    index_dim: int
    scan: bool | str = False  # False, "split", "padded" or "uniform": layers stacked (see the module docstring)

    @property
    def padded(self) -> bool:
        """Retrieval slots padded to every query head of a full KV head (`scan="padded"` or `"uniform"`)."""
        return self.scan in ("padded", "uniform")

    def stacked(self, layer: int) -> LayerLayout:
        """The layout layer `layer` runs in (its group's shared layout when stacked; its own otherwise)."""
        ll = self.layers[layer]
        if not self.scan:
            return ll
        return ll.padded(always=self.scan == "uniform") if self.padded else ll.canonical()

    @property
    def groups(self) -> tuple[tuple[int, ...], ...]:
        """Layer ids per stacked buffer, in order of first appearance (one group per layer when not stacked)."""
        if not self.scan:
            return tuple((i,) for i in range(len(self.layers)))
        out: dict = {}
        for i in range(len(self.layers)):
            out.setdefault(self.stacked(i), []).append(i)
        return tuple(tuple(v) for v in out.values())

    def slot(self, layer: int) -> tuple[int, int]:
        """(buffer, index in it) of `layer`."""
        return next((g, ids.index(layer)) for g, ids in enumerate(self.groups) if layer in ids)

    @classmethod
    def build(cls, cfg: ModelConfig, sparse: SparseConfig | None, max_len: int, scan: bool | str = False) -> "CacheLayout":
        """Layout for a model; `sparse=None` gives a dense cache (every KV head full, no index keys); `scan`:
        False, True / "split" (stack layers of equal head split), "padded" (of equal full / local KV counts) or
        "uniform" (all layers, their full KV heads promoted to the widest layer's count: `LayerLayout.promote`)."""
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        if scan not in SCAN_MODES:
            raise ValueError(f"scan must be one of {SCAN_MODES}, got {scan!r}")
        scan = "split" if scan is True else scan
        g = cfg.num_heads // cfg.num_kv_heads
        if sparse is None:  # every layer alike: any stacking is one buffer of the same layout
            scan = "split" if scan else False
            layers = tuple(LayerLayout(tuple(range(cfg.num_kv_heads)), (), (), g) for _ in range(cfg.num_layers))
            return cls(layers, max_len, 0, 0, max_len, 0, scan)
        sparse.check_model(cfg.num_layers, cfg.num_heads, cfg.num_kv_heads)
        layers = tuple(LayerLayout.from_roles(r, cfg.num_kv_heads, sparse.shared_index_keys)
                       for r in sparse.roles_array)
        if scan == "uniform":
            widest = max(len(ll.full_kv) for ll in layers)
            layers = tuple(ll.promote(widest) for ll in layers)
        sinks = min(sparse.sinks, max_len)
        return cls(layers, max_len, sinks, min(sparse.local_span, max_len - sinks), sparse.window,
                   sparse.index_dim, scan)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
    """One layer's arrays (any of them may have a zero-sized head axis).

    k_full, v_full: [B, S, Kf, H]; k_sink, v_sink: [B, sinks, Kl, H]; k_ring, v_ring: [B, ring, Kl, H];
    k_index: [B, S, R, I] (the cache dtype, or `SparseConfig.index_dtype`); [B, S, K, I] with one slot per KV group
    when the layout's `shared_keys` (`LayerLayout.key_slot`).
    """

    k_full: jax.Array
    v_full: jax.Array
    k_sink: jax.Array
    v_sink: jax.Array
    k_ring: jax.Array
    v_ring: jax.Array
    k_index: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HybridCache:
    """layers: one LayerCache per layer, or with `layout.scan` one per group of layers (`layout.groups`), its
    arrays stacked on a leading axis; lengths: int32 [B] positions written so far per sequence."""

    layers: tuple[LayerCache, ...]
    lengths: jax.Array
    layout: CacheLayout = dataclasses.field(metadata=dict(static=True))

    def layer(self, i: int) -> LayerCache:
        """Layer i's arrays (a slice of its group's buffer when stacked; padded slots' index keys dropped). With
        `scan="uniform"` K / V are in the promoted layout (`layout.layers[i]`: some local KV heads kept whole)."""
        g, j = self.layout.slot(i)
        if not self.layout.scan:
            return self.layers[g]
        lc = jax.tree.map(lambda a: a[j], self.layers[g])
        if self.layout.padded:  # drop the phantom index-key slots (those of heads local in this layer)
            st, act = self.layout.stacked(i), self.layout.layers[i].active()
            act = np.pad(act, (0, len(st.retrieval_q) - len(act)))  # a layer with no retrieval head: none active
            keep = [j for j, h in enumerate(st.index_heads) if act[st.retrieval_q.index(h)]]
            lc = dataclasses.replace(lc, k_index=lc.k_index[:, :, np.asarray(keep, np.int32)])
        return lc


def init_cache(cfg: ModelConfig, batch: int, max_len: int, sparse: SparseConfig | None = None,
               dtype=jnp.bfloat16, scan: bool | str = False) -> HybridCache:
    """An empty cache for `batch` sequences of up to `max_len` positions (sparse=None: a dense cache). scan:
    stack layers (serving then scans over layers): True / "split" those of equal head split, "padded" those of
    equal full / local KV counts, "uniform" all of them (see the module docstring)."""
    layout = CacheLayout.build(cfg, sparse, max_len, scan)
    index_dtype = sparse.index_dtype if sparse is not None else None
    h = cfg.head_dim
    layers = []
    for ids in layout.groups:
        ll = layout.stacked(ids[0])
        z = lambda *shape: jnp.zeros(((len(ids),) if scan else ()) + (batch,) + shape, dtype)
        layers.append(LayerCache(
            k_full=z(max_len, len(ll.full_kv), h), v_full=z(max_len, len(ll.full_kv), h),
            k_sink=z(layout.sinks, len(ll.local_kv), h), v_sink=z(layout.sinks, len(ll.local_kv), h),
            k_ring=z(layout.ring, len(ll.local_kv), h), v_ring=z(layout.ring, len(ll.local_kv), h),
            k_index=jnp.zeros(((len(ids),) if scan else ()) + (batch, max_len, len(ll.index_heads), layout.index_dim),
                              index_dtype or dtype)))
    return HybridCache(tuple(layers), jnp.zeros((batch,), jnp.int32), layout)


def cache_bytes(cache: HybridCache) -> dict:
    """dict(hybrid, dense, ratio, kv, index_keys): bytes held by `cache` next to a dense cache of its shape.

    Works on abstract caches too (`jax.eval_shape(init_cache, ...)`), so 1M-token shapes cost no memory.
    """
    nbytes = lambda x: int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
    kv = idx = 0
    for lc in cache.layers:
        kv += sum(nbytes(x) for x in (lc.k_full, lc.v_full, lc.k_sink, lc.v_sink, lc.k_ring, lc.v_ring))
        idx += nbytes(lc.k_index)
    lc = cache.layers[0]
    b, s, h = cache.lengths.shape[0], cache.layout.max_len, lc.k_full.shape[-1]
    kv_heads = len(cache.layout.layers[0].full_kv) + len(cache.layout.layers[0].local_kv)
    dense = len(cache.layout.layers) * b * s * kv_heads * h * 2 * jnp.dtype(lc.k_full.dtype).itemsize
    return {"hybrid": kv + idx, "dense": dense, "ratio": (kv + idx) / dense, "kv": kv, "index_keys": idx}


def formula_bytes(cfg: ModelConfig, sparse: SparseConfig, max_len: int, batch: int = 1, bytes_per_elem: int = 2):
    """`kv_memory.kv_cache_bytes` for this model and config (what `cache_bytes` must equal)."""
    ib = None if sparse.index_dtype is None else jnp.dtype(sparse.index_dtype).itemsize
    out = kv_cache_bytes(sparse.roles_array, cfg.num_kv_heads, cfg.head_dim, max_len, sinks=sparse.sinks,
                         window=sparse.local_span, index_dim=sparse.index_dim, bytes_per_elem=bytes_per_elem,
                         index_bytes_per_elem=ib, shared_index_keys=sparse.shared_index_keys)
    return {k: v * batch if k in ("dense", "rtpurbo", "kv", "index_keys") else v for k, v in out.items()}


def ring_positions(layout: CacheLayout, last: jax.Array) -> jax.Array:
    """int32 [B, ring]: the position held by each ring slot when positions 0..last[b] are written; -1 if empty."""
    r = max(layout.ring, 1)
    rel = jnp.asarray(last, jnp.int32)[:, None] - layout.sinks  # newest non-sink position, relative
    j = jnp.arange(layout.ring, dtype=jnp.int32)[None]
    held = rel - jnp.mod(rel - j, r)
    return jnp.where((rel >= 0) & (held >= 0), held + layout.sinks, -1)


def cache_shardings(cache: HybridCache, mesh, data_axis: str | None = "data", model_axis: str | None = "model"):
    """NamedShardings for `cache`: batch over `data_axis`, heads over `model_axis` where they divide evenly
    (a layer whose head count does not divide the axis keeps that array replicated over it)."""
    names = set(mesh.axis_names)
    size = lambda a: mesh.shape[a] if a in names else 1

    lead = (None,) if cache.layout.scan else ()  # the stacked layers' axis

    def spec(x):
        if x.ndim == 1:
            return NamedSharding(mesh, P(data_axis if data_axis in names and x.shape[0] % size(data_axis) == 0 else None))
        shape = x.shape[len(lead):]
        d = data_axis if data_axis in names and shape[0] % size(data_axis) == 0 else None
        m = model_axis if model_axis in names and shape[2] and shape[2] % size(model_axis) == 0 else None
        return NamedSharding(mesh, P(*lead, d, None, m, None))

    return jax.tree.map(spec, cache)


__all__ = ["SCAN_MODES", "CacheLayout", "HybridCache", "LayerCache", "LayerLayout", "cache_bytes", "cache_shardings",
           "formula_bytes", "init_cache", "ring_positions"]
