"""DecodePlan: the key blocks one decode token visits, per GQA group (KV head), with a per-query-head mask.

A GQA group's query heads may select different blocks (retrieval heads' top-p sets, local heads' sink +
window band). The group reads the **union** of its heads' blocks once; `head_mask` says which heads use each
union entry. Token visibility inside a visited block, for query head n of sequence b (query at position
q_pos = kv_len[b] - 1):

    visible(b, n, s) = head_mask[b, n // G, j, n % G] for the union entry j holding block(s)
                       and s <= q_pos(b, n) and s < kv_len[b]
                       and (s < sinks[n] or q_pos(b, n) - s < window[n])
    q_pos(b, n) = kv_len[b] - 1 - q_shift[n]

Arrays: kv_blocks int32 [B, K, M] (ascending union ids in the first `counts` entries, then repeats of the last),
counts int32 [B, K], head_mask bool [B, K, M, G], sinks / window int32 [N], kv_len int32 [B], q_shift int32 [N]
or None (zeros); static kv_block.

A few query tokens per sequence (chunked or speculative decoding): the C tokens at positions kv_len - C .. kv_len
- 1 become C·N query rows, `fold_tokens` orders them so that each GQA group holds its G heads × C tokens, and
`q_shift` = C - 1 - c puts row c at its own position. The group then reads the union of all its rows' blocks
once.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.block_plan import pack_ascending


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodePlan:
    kv_blocks: jax.Array
    counts: jax.Array
    head_mask: jax.Array
    sinks: jax.Array
    window: jax.Array
    kv_len: jax.Array
    kv_block: int = dataclasses.field(metadata=dict(static=True))
    q_shift: jax.Array | None = None

    def shifts(self) -> jax.Array:
        """int32 [N]: q_shift, zeros when unset."""
        n = self.sinks.shape[0]
        return jnp.zeros((n,), jnp.int32) if self.q_shift is None else jnp.asarray(self.q_shift, jnp.int32)


def decode_plan(sel: jax.Array, num_kv_heads: int, *, sinks, window, kv_len, kv_block: int,
                max_blocks: int | None = None, q_shift=None) -> DecodePlan:
    """Pack a per-head block selection bool [B, N, Sb] into a DecodePlan with M = max_blocks or Sb.

    A group keeping more than M union blocks keeps its lowest ids (callers size M to their budgets).
    """
    b, n, sb = sel.shape
    g = n // num_kv_heads
    grp = sel.reshape(b, num_kv_heads, g, sb)
    union = grp.any(2)  # [B, K, Sb]
    m = sb if max_blocks is None else min(max_blocks, sb)
    blocks, counts = pack_ascending(union, m)  # the lowest ids when a group keeps more than M
    valid = jnp.arange(m) < counts[..., None]  # [B, K, M]
    hm = jnp.take_along_axis(grp, blocks[:, :, None, :], axis=-1) & valid[:, :, None, :]  # [B, K, G, M]
    return DecodePlan(kv_blocks=blocks.astype(jnp.int32), counts=counts, head_mask=jnp.moveaxis(hm, 2, 3),
                      sinks=jnp.broadcast_to(jnp.asarray(sinks, jnp.int32), (n,)),
                      window=jnp.broadcast_to(jnp.asarray(window, jnp.int32), (n,)),
                      kv_len=jnp.broadcast_to(jnp.asarray(kv_len, jnp.int32), (b,)), kv_block=kv_block,
                      q_shift=None if q_shift is None else jnp.broadcast_to(jnp.asarray(q_shift, jnp.int32), (n,)))


def head_mask_words(plan: DecodePlan) -> jax.Array:
    """int32 [B, K, M]: each union entry's head mask as one word, bit h for query head h of the group (G <= 32),
    what the decode kernels read instead of G flags per entry."""
    g = plan.head_mask.shape[-1]
    if g > 32:
        raise ValueError(f"head_mask_words: at most 32 query heads per KV head, got {g}")
    words = (plan.head_mask.astype(jnp.uint32) << jnp.arange(g, dtype=jnp.uint32)).sum(-1, dtype=jnp.uint32)
    return jax.lax.bitcast_convert_type(words, jnp.int32)


def kernel_dims(q, num_keys: int, num_kv_heads: int, plan: DecodePlan) -> tuple[int, int, int, int, int, int]:
    """(B, N, H, G, kv_block, M) of a decode kernel call on q [B, N, H] over num_keys keys (a multiple of
    kv_block: the api pads) of num_kv_heads groups."""
    b, n, h = q.shape
    if num_keys % plan.kv_block:
        raise ValueError(f"S={num_keys} must be a multiple of kv_block={plan.kv_block} (the api pads)")
    return b, n, h, n // num_kv_heads, plan.kv_block, plan.kv_blocks.shape[-1]


def decode_token_mask(plan: DecodePlan, seq_len: int) -> jax.Array:
    """bool [B, N, S]: the exact visibility a plan defines (tests and the reference)."""
    b, k, m = plan.kv_blocks.shape
    g = plan.head_mask.shape[-1]
    sb = -(-seq_len // plan.kv_block)
    onehot = plan.kv_blocks[..., None] == jnp.arange(sb)  # [B, K, M, Sb]
    per_head = (onehot[:, :, :, None, :] & plan.head_mask[..., None]).any(2)  # [B, K, G, Sb]
    blk = per_head.reshape(b, k * g, sb)[..., jnp.arange(seq_len) // plan.kv_block]
    s = jnp.arange(seq_len)
    q_pos = (plan.kv_len - 1)[:, None, None] - plan.shifts()[None, :, None]
    band = (s < plan.sinks[None, :, None]) | (q_pos - s < plan.window[None, :, None])
    return blk & band & (s <= q_pos) & (s < plan.kv_len[:, None, None])


def fold_tokens(x: jax.Array, num_kv_heads: int) -> jax.Array:
    """[B, C, N, ...] per-token head rows -> [B, N·C, ...] with row (k, g, c) at (k·G + g)·C + c, so a GQA
    group of the folded rows holds its G heads × C tokens."""
    b, c, n = x.shape[:3]
    g = n // num_kv_heads
    x = x.reshape(b, c, num_kv_heads, g, *x.shape[3:])
    return jnp.moveaxis(x, 1, 3).reshape(b, n * c, *x.shape[4:])


def unfold_tokens(x: jax.Array, num_tokens: int, num_kv_heads: int) -> jax.Array:
    """Inverse of `fold_tokens`: [B, N·C, ...] -> [B, C, N, ...]."""
    b, nc = x.shape[:2]
    n = nc // num_tokens
    x = x.reshape(b, num_kv_heads, n // num_kv_heads, num_tokens, *x.shape[2:])
    return jnp.moveaxis(x, 3, 1).reshape(b, num_tokens, n, *x.shape[4:])


def token_shifts(num_heads: int, num_tokens: int) -> jax.Array:
    """int32 [N·C]: q_shift of the folded rows (token c of C sits C - 1 - c positions before the last)."""
    c = jnp.arange(num_tokens, dtype=jnp.int32)
    return jnp.tile(num_tokens - 1 - c, num_heads)
