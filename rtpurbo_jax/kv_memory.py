"""KV-cache bytes of the hybrid RTPurbo cache next to a dense cache (formula; `init_cache` must agree).

Per layer and KV head: if any of its query heads is a retrieval head, it keeps all S tokens of K and V;
otherwise it keeps min(S, sinks + window) tokens. Each retrieval *query* head also keeps its index keys
(index_dim values per token). Bytes = tokens × head_dim × 2 (K and V) × bytes per element.
"""

from __future__ import annotations

import numpy as np


def kv_cache_bytes(roles, num_kv_heads: int, head_dim: int, seq_len: int, *, sinks: int, window: int,
                   index_dim: int = 16, bytes_per_elem: int = 2, index_bytes_per_elem: int | None = None,
                   shared_index_keys: bool = False) -> dict:
    """dict(dense, rtpurbo, kv, index_keys, ratio, full_kv_heads) for roles bool [L, N] at seq_len tokens.
    shared_index_keys: one index key per full KV head instead of one per retrieval head."""
    roles = np.asarray(roles, bool)
    L, N = roles.shape
    g = N // num_kv_heads
    full_kv = roles.reshape(L, num_kv_heads, g).any(-1)  # [L, K]
    per_token = head_dim * 2 * bytes_per_elem
    dense = L * num_kv_heads * seq_len * per_token
    local_len = min(seq_len, sinks + window)
    kv = int(full_kv.sum()) * seq_len * per_token + int((~full_kv).sum()) * local_len * per_token
    ib = bytes_per_elem if index_bytes_per_elem is None else index_bytes_per_elem
    index = int(full_kv.sum() if shared_index_keys else roles.sum()) * seq_len * index_dim * ib
    total = kv + index
    return {"dense": dense, "rtpurbo": total, "kv": kv, "index_keys": index, "ratio": total / dense,
            "full_kv_heads": int(full_kv.sum()), "kv_heads": L * num_kv_heads}
