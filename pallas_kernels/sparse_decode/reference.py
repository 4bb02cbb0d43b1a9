"""Pure-jnp sparse decode attention over a DecodePlan: the definition the kernels are checked against.

Axes: B batch, N query heads, K KV heads, G = N / K, S cache length, H head_dim.
"""

from __future__ import annotations

import jax

from pallas_kernels.sparse_attention.reference import masked_attention
from pallas_kernels.sparse_decode.plan import DecodePlan, decode_token_mask


@jax.jit
def sparse_decode_attention(q, k, v, plan: DecodePlan, scale=None):
    """q [B, N, H] (the token at position kv_len - 1), k / v [B, S, K, H] -> (out [B, N, H] in q.dtype,
    lse fp32 [B, N]). Rows that see no key give zeros and -inf. Memory O(B · N · S)."""
    mask = decode_token_mask(plan, k.shape[1])[:, :, None, :]  # [B, N, 1, S]
    out, lse = masked_attention(q[:, None], k, v, mask, scale)
    return out[:, 0].astype(q.dtype), lse[..., 0]
