"""SparseConfig: everything that defines RTPurbo attention for one model (defaults from the paper).

Roles are per **query head** `[layers][q_heads]` (1 = retrieval head: full context through the indexer;
0 = local head: `sinks` + the last `window` tokens). Granularity `kv` requires whole GQA groups to share a
role, so that a KV head whose query heads are all local can really drop to sinks + window in the cache.
JSON round-trip (`to_dict` / `from_dict`) and RTP-LLM's `headwise_config` (`to_headwise` / `from_headwise`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

GRANULARITIES = ("query", "kv")
PREFILL_MODES = ("dense", "indexer")
SELECTORS = ("indexer", "oracle")
INDEX_DTYPES = ("bfloat16", "float16", "float32", "float8_e4m3fn")


@dataclasses.dataclass(frozen=True)
class SparseConfig:
    roles: tuple[tuple[int, ...], ...]  # [L][N], 1 = retrieval
    sinks: int = 4
    window: int = 8192  # keys with q_pos - k_pos < window are visible to local heads (own token included)
    kv_block: int = 64  # tokens per key block (the unit of top-p selection)
    q_block: int = 128  # query rows per plan tile in prefill
    index_dim: int = 16
    top_p: float = 0.9
    seqlen_threshold: int = 16384  # shorter sequences run every head dense (RTP-LLM's switch); 0 disables
    granularity: str = "query"
    prefill_mode: str = "dense"  # retrieval heads in prefill: dense (the paper) or indexer (top-p per q tile)
    max_blocks: int | None = None  # optional budget of key blocks per retrieval row (forced blocks included)
    keep_recent: int = 64  # retrieval heads always keep blocks overlapping the last `keep_recent` tokens
    # what scores the blocks of retrieval heads: the learned indexer, or "oracle" — the head's exact attention
    # logits (post-RoPE q·k / sqrt(H) over the full keys). The oracle is the ceiling any indexer can reach, an
    # instrument for accuracy benchmarks: it reads every key, so it saves no work.
    selector: str = "indexer"
    # the dtype the cache stores index keys in (None: the cache's dtype). "float8_e4m3fn" halves the bytes decode
    # scoring reads (values saturate at +-448); an option until the accuracy suite has measured it
    index_dtype: str | None = None
    # the indexer's key maps are shared by the retrieval heads of each KV head (`train.distill --share-index-keys`):
    # the cache then stores one index key per (layer, KV head) instead of one per retrieval head, and decode scoring
    # reads each once for the group (`serving.check_indexer` refuses an indexer whose key maps differ in a group);
    # the full-sequence forward (`lm.apply`, training) projects keys per head as before: the same values
    shared_index_keys: bool = False

    def __post_init__(self):
        roles = tuple(tuple(int(r) for r in layer) for layer in self.roles)
        object.__setattr__(self, "roles", roles)
        if not roles or len({len(r) for r in roles}) != 1:
            raise ValueError("roles must be a non-empty [layers][q_heads] table with equal rows")
        if any(r not in (0, 1) for layer in roles for r in layer):
            raise ValueError("roles must hold only 0 (local) and 1 (retrieval)")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        for name in ("sinks", "seqlen_threshold", "keep_recent"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("window", "kv_block", "q_block", "index_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.prefill_mode not in PREFILL_MODES:
            raise ValueError(f"prefill_mode must be one of {PREFILL_MODES}, got {self.prefill_mode!r}")
        if self.selector not in SELECTORS:
            raise ValueError(f"selector must be one of {SELECTORS}, got {self.selector!r}")
        if self.index_dtype is not None and self.index_dtype not in INDEX_DTYPES:
            raise ValueError(f"index_dtype must be None or one of {INDEX_DTYPES}, got {self.index_dtype!r}")
        if self.max_blocks is not None and self.max_blocks < 1:
            raise ValueError(f"max_blocks must be >= 1 or None, got {self.max_blocks}")

    @property
    def roles_array(self) -> np.ndarray:
        """bool [L, N]: True for retrieval heads."""
        return np.asarray(self.roles, dtype=bool)

    @property
    def local_span(self) -> int:
        """Past positions (beyond the sinks) a local KV head's cache must hold: the window, or up to
        `seqlen_threshold` when that is larger (a call shorter than the threshold runs every head dense)."""
        return max(self.window, self.seqlen_threshold) if self.seqlen_threshold > 0 else self.window

    @property
    def num_layers(self) -> int:
        return len(self.roles)

    @property
    def num_heads(self) -> int:
        return len(self.roles[0])

    def check_model(self, num_layers: int, num_heads: int, num_kv_heads: int) -> None:
        """Raise ValueError unless roles fit the model (and whole GQA groups share roles under `kv`)."""
        if (self.num_layers, self.num_heads) != (num_layers, num_heads):
            raise ValueError(f"roles are [{self.num_layers}, {self.num_heads}] but the model has "
                             f"{num_layers} layers x {num_heads} query heads")
        if self.granularity == "kv":
            g = self.roles_array.reshape(num_layers, num_kv_heads, num_heads // num_kv_heads)
            if not (g.all(-1) | ~g.any(-1)).all():
                raise ValueError("granularity 'kv' needs every query head of a GQA group to share its role")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["roles"] = [list(r) for r in self.roles]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SparseConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown SparseConfig fields: {sorted(unknown)}")
        return cls(**{**d, "roles": tuple(tuple(r) for r in d["roles"])})

    def to_headwise(self) -> dict[str, Any]:
        """RTP-LLM's `headwise_config`: sink/window/threshold plus per-layer 0/1 lists per query head."""
        out: dict[str, Any] = {"sink_token_num": self.sinks, "swa_token_num": self.window,
                               "seqlen_threshold": self.seqlen_threshold}
        out.update({str(i): list(r) for i, r in enumerate(self.roles)})
        return out

    @classmethod
    def from_headwise(cls, hw: dict[str, Any], **overrides) -> "SparseConfig":
        layer_keys = sorted((k for k in hw if k.isdigit()), key=int)
        if [int(k) for k in layer_keys] != list(range(len(layer_keys))):
            raise ValueError(f"headwise_config layer keys must be 0..L-1, got {layer_keys}")
        kw = dict(roles=tuple(tuple(hw[k]) for k in layer_keys), sinks=hw.get("sink_token_num", 4),
                  window=hw.get("swa_token_num", 8192), seqlen_threshold=hw.get("seqlen_threshold", 16384))
        return cls(**{**kw, **overrides})


def roles_to_kv_granularity(roles: np.ndarray, num_kv_heads: int) -> np.ndarray:
    """bool [L, N]: mark a whole GQA group retrieval when any of its query heads is."""
    roles = np.asarray(roles, bool)
    L, N = roles.shape
    g = roles.reshape(L, num_kv_heads, N // num_kv_heads).any(-1, keepdims=True)
    return np.broadcast_to(g, (L, num_kv_heads, N // num_kv_heads)).reshape(L, N)
