"""Independent float64 numpy definitions used by the tests (no code shared with the library)."""

from __future__ import annotations

import numpy as np


def band_mask(t: int, s: int, sinks, window, q_offset: int, n: int) -> np.ndarray:
    """bool [N, T, S]: causal, sink tokens always visible, else q_pos - k_pos < window."""
    sinks = np.broadcast_to(np.asarray(sinks), (n,))
    window = np.broadcast_to(np.asarray(window), (n,))
    out = np.zeros((n, t, s), bool)
    for h in range(n):
        for i in range(t):
            qp = q_offset + i
            for j in range(s):
                out[h, i, j] = j <= qp and (j < sinks[h] or qp - j < window[h])
    return out


def attention(q, k, v, mask) -> np.ndarray:
    """q [B,T,N,H], k/v [B,S,K,H], mask bool [B,N,T,S] -> float64 [B,T,N,H]; fully masked rows give 0."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, n, h = q.shape
    g = n // k.shape[2]
    out = np.zeros((b, t, n, h))
    for bi in range(b):
        for hi in range(n):
            s = q[bi, :, hi] @ k[bi, :, hi // g].T / np.sqrt(h)
            s = np.where(mask[bi, hi], s, -np.inf)
            mx = s.max(-1, keepdims=True)
            p = np.where(mask[bi, hi], np.exp(s - np.where(np.isfinite(mx), mx, 0)), 0)
            d = p.sum(-1, keepdims=True)
            out[bi, :, hi] = (p / np.where(d > 0, d, 1)) @ v[bi, :, hi // g]
    return out
