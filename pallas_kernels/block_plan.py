"""BlockPlan: which key blocks each (batch, query head, query block) visits, and the token mask inside them.

A plan is data, apart from the kernels: plan builders (the static sink + window band here, the indexer top-p
builder in `pallas_kernels.indexer_topp`) produce a `BlockPlan`; kernels only consume it. `plan_to_dense_mask`
turns a plan into a boolean [B, N, T, S] mask so any kernel can be checked against dense masked attention.

Positions. Query row t of sequence b sits at absolute position `q_offset + q_start[b] + t`; key column s at
position s. `q_offset` is static (0 for a prefill); `q_start` int32 [B] is traced (serving: each sequence's
cached length before a prefill chunk) and defaults to zeros.

Token visibility (elementwise, applied inside every visited block):
    visible(b, n, t, s) = block(s) selected for (b, n, block(t))      # the plan
                          and s <= q_offset + t                          # causal
                          and s < kv_len[b]                              # padding (right-padded batches)
                          and (s < sinks[n] or (q_offset + t) - s < window[n])

Example, 6 tokens, sinks = 1, window = 2 (no plan restriction), rows = queries, columns = keys:
    1 . . . . .
    1 1 . . . .
    1 1 1 . . .
    1 . 1 1 . .
    1 . . 1 1 .
    1 . . . 1 1
`window[n] >= S` (e.g. `FULL_WINDOW`) means "no window": plain causal attention.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

FULL_WINDOW = np.iinfo(np.int32).max // 2  # "no window"; halved so q_pos - s never overflows against it


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """Padded lists of key blocks per (batch, query head, query block).

    Arrays:
      kv_blocks: int32 [B, N, Tb, M] — selected key-block ids, ascending in the first `counts` entries; entries
                 past `counts` repeat the last valid id (0 when the count is 0) so a kernel may prefetch them
                 harmlessly.
      counts:    int32 [B, N, Tb] — how many entries of `kv_blocks` are valid, 0..M.
      sinks:     int32 [N] — sink tokens per query head (always visible, still causal).
      window:    int32 [N] — a query sees keys with q_pos - s < window (its own token included).
      kv_len:    int32 [B] — valid keys per sequence (right padding beyond).
      q_start:   int32 [B] or None (zeros) — traced per-sequence offset of query row 0, added to q_offset.
    Static: q_block, kv_block (tokens per block), q_offset (absolute position of query row 0).
    Tb = ceil(T / q_block); M <= ceil(S / kv_block).
    """

    kv_blocks: jax.Array
    counts: jax.Array
    sinks: jax.Array
    window: jax.Array
    kv_len: jax.Array
    q_block: int = dataclasses.field(metadata=dict(static=True))
    kv_block: int = dataclasses.field(metadata=dict(static=True))
    q_offset: int = dataclasses.field(default=0, metadata=dict(static=True))
    q_start: jax.Array | None = None

    def query_starts(self) -> jax.Array:
        """int32 [B]: absolute position of query row 0 per sequence (q_offset + q_start)."""
        b = self.kv_blocks.shape[0]
        start = jnp.zeros((b,), jnp.int32) if self.q_start is None else jnp.asarray(self.q_start, jnp.int32)
        return self.q_offset + jnp.broadcast_to(start, (b,))

    @property
    def num_kv_blocks_max(self) -> int:
        return self.kv_blocks.shape[-1]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def is_concrete(*xs) -> bool:
    """True unless one of `xs` is a tracer (inside jit / grad): value checks only run on concrete arrays."""
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def check_plan_values(kv_blocks, counts, kv_len, num_kv_blocks: int, num_keys: int, what: str) -> None:
    """Raise ValueError unless a plan's valid entries are block ids in [0, num_kv_blocks), its counts lie in
    0..M and its kv_len in 0..num_keys. Values are checked only on concrete arrays (outside jit), in one
    device-to-host read; under jit the caller's plan builder is trusted."""
    if not is_concrete(kv_blocks, counts, kv_len):
        return
    m = kv_blocks.shape[-1]
    valid = jnp.arange(m) < counts[..., None]
    ids = jnp.where(valid, kv_blocks, 0)
    stats = jnp.stack([ids.min(), ids.max(), counts.min(), counts.max(), jnp.min(kv_len), jnp.max(kv_len)])
    if isinstance(stats, jax.core.Tracer):  # concrete plan captured inside a jit: the caller's trace, no check
        return
    lo, hi, cmin, cmax, lmin, lmax = (int(x) for x in jax.device_get(stats.astype(jnp.int32)))
    if lo < 0 or hi >= num_kv_blocks:
        raise ValueError(f"{what}: block ids must lie in [0, {num_kv_blocks}) for {num_keys} keys, got [{lo}, {hi}]")
    if cmin < 0 or cmax > m:
        raise ValueError(f"{what}: counts must lie in 0..{m} (the plan's entries per row), got [{cmin}, {cmax}]")
    if lmin < 0 or lmax > num_keys:
        raise ValueError(f"{what}: kv_len must lie in 0..{num_keys} (the keys given), got [{lmin}, {lmax}]")


def check_inputs(q, k, v, what: str) -> None:
    """Raise ValueError unless q, k, v are floating-point arrays (integer inputs would return integers)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
            raise ValueError(f"{what}: {name} must be a floating-point array, got {jnp.asarray(x).dtype}")


def selection_from_plan(plan: BlockPlan, num_kv_blocks: int) -> jax.Array:
    """bool [B, N, Tb, Sb]: True where key block kb is in the plan of (b, n, tb)."""
    m = plan.kv_blocks.shape[-1]
    valid = jnp.arange(m) < plan.counts[..., None]
    onehot = (plan.kv_blocks[..., None] == jnp.arange(num_kv_blocks)) & valid[..., None]
    return onehot.any(axis=-2)


def plan_from_selection(sel: jax.Array, *, sinks, window, kv_len, q_block: int, kv_block: int,
                        q_offset: int = 0, max_blocks: int | None = None, q_start=None) -> BlockPlan:
    """Pack a boolean block selection bool [B, N, Tb, Sb] into a BlockPlan with M = max_blocks or Sb.

    Keeps the lowest block ids when a row selects more than M blocks (callers enforce budgets before this).
    """
    sb = sel.shape[-1]
    blocks, counts = pack_ascending(jnp.asarray(sel, bool), sb if max_blocks is None else min(max_blocks, sb))
    b, n = sel.shape[:2]
    return BlockPlan(
        kv_blocks=blocks, counts=counts,
        sinks=jnp.broadcast_to(jnp.asarray(sinks, jnp.int32), (n,)),
        window=jnp.broadcast_to(jnp.asarray(window, jnp.int32), (n,)),
        kv_len=jnp.broadcast_to(jnp.asarray(kv_len, jnp.int32), (b,)),
        q_block=q_block, kv_block=kv_block, q_offset=q_offset,
        q_start=None if q_start is None else jnp.broadcast_to(jnp.asarray(q_start, jnp.int32), (b,)))


def token_mask(plan: BlockPlan, q_pos: jax.Array, k_pos: jax.Array, block_sel: jax.Array) -> jax.Array:
    """bool [B, N, C, S'] for query positions q_pos int [C] or [B, C] and key positions k_pos int [S'].

    `block_sel` bool [B, N, C, S'] says whether (query row, key) lies in a selected block.
    """
    q_pos = jnp.asarray(q_pos)
    qp = (q_pos if q_pos.ndim == 2 else q_pos[None])[:, None, :, None]  # [B|1, 1, C, 1]
    kp = k_pos[None, None, None, :]
    causal = kp <= qp
    band = (kp < plan.sinks[None, :, None, None]) | ((qp - kp) < plan.window[None, :, None, None])
    inlen = kp < plan.kv_len[:, None, None, None]
    return block_sel & causal & band & inlen


def plan_to_dense_mask(plan: BlockPlan, q_len: int, kv_len: int) -> jax.Array:
    """bool [B, N, T, S]: the exact token visibility a plan defines. O(B·N·T·S) memory: tests only."""
    nkb = cdiv(kv_len, plan.kv_block)
    sel = selection_from_plan(plan, nkb)  # [B, N, Tb, Sb]
    rows = jnp.arange(q_len) // plan.q_block
    cols = jnp.arange(kv_len) // plan.kv_block
    block_sel = sel[:, :, rows][:, :, :, cols]
    q_pos = plan.query_starts()[:, None] + jnp.arange(q_len)[None]
    return token_mask(plan, q_pos, jnp.arange(kv_len), block_sel)


def band_blocks(q_lo, q_hi, num_kv_blocks: int, kv_block: int, sinks, window, kv_len=None):
    """bool [..., Sb]: the key blocks a sink + window band can touch for a query span [q_lo, q_hi].

    The one definition of the band at block level (plans for local heads, forced blocks of retrieval heads).
    q_lo, q_hi: int arrays [...] (traced is fine; numpy in, numpy out); sinks, window: ints or arrays that
    broadcast against [...]. Block kb is kept when some query of the span can see some key of kb: it holds a
    sink (kb * kv_block < sinks) or overlaps [q_lo - window + 1, q_hi]. kv_len (optional, int): the last block
    ends at kv_len (a partial block).
    """
    xp = np if all(isinstance(x, (int, np.integer, np.ndarray)) for x in (q_lo, q_hi, sinks, window)) else jnp
    k_lo = xp.arange(num_kv_blocks) * kv_block
    k_hi = k_lo + kv_block - 1 if kv_len is None else xp.minimum(k_lo + kv_block, kv_len) - 1
    lo, hi = xp.asarray(q_lo)[..., None], xp.asarray(q_hi)[..., None]
    sinks, window = xp.asarray(sinks)[..., None], xp.asarray(window)[..., None]
    return (k_lo <= hi) & ((k_lo < sinks) | (k_hi > lo - window))


def band_selection(num_heads: int, q_len: int, kv_len: int, *, sinks, window, q_block: int, kv_block: int,
                   q_offset: int = 0) -> np.ndarray:
    """Static bool [N, Tb, Sb]: `band_blocks` for every query block of a prefill (numpy, shapes static).

    `sinks` and `window` are ints or int arrays [N].
    """
    sinks = np.broadcast_to(np.asarray(sinks, np.int64), (num_heads,))[:, None]
    window = np.broadcast_to(np.asarray(window, np.int64), (num_heads,))[:, None]
    tb, sb = cdiv(q_len, q_block), cdiv(kv_len, kv_block)
    q_lo = q_offset + np.arange(tb) * q_block
    q_hi = q_offset + np.minimum((np.arange(tb) + 1) * q_block, q_len) - 1
    return band_blocks(q_lo[None], q_hi[None], sb, kv_block, sinks, window, kv_len=kv_len)


def band_plan(batch: int, num_heads: int, q_len: int, kv_len: int, *, sinks, window, q_block: int,
              kv_block: int, q_offset: int = 0, lengths=None) -> BlockPlan:
    """Static plan for heads that see `sinks` + the last `window` tokens (window=FULL_WINDOW: dense causal)."""
    sel = band_selection(num_heads, q_len, kv_len, sinks=sinks, window=window, q_block=q_block,
                         kv_block=kv_block, q_offset=q_offset)
    m = max(int(sel.sum(-1).max()), 1)  # static: the band's widest row, not all Sb blocks
    sel = jnp.broadcast_to(jnp.asarray(sel), (batch,) + sel.shape)
    kv_len_arr = kv_len if lengths is None else lengths
    return plan_from_selection(sel, sinks=sinks, window=window, kv_len=kv_len_arr, q_block=q_block,
                               kv_block=kv_block, q_offset=q_offset, max_blocks=m)


def pack_ascending(active: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
    """(ids int32 [..., m], counts int32 [...]): the positions where active bool [..., S] holds, ascending (the
    lowest m when there are more), then repeats of the last (0 when none). Sort-free — a prefix count and one
    scatter of distinct slots (XLA sorts are slow on TPUs): the packing of decode plans and TPU tile plans."""
    lead, s = active.shape[:-1], active.shape[-1]
    flat = active.reshape(-1, s)
    pos = jnp.arange(s, dtype=jnp.int32)
    incl = jnp.cumsum(flat.astype(jnp.int32), axis=-1)
    slot = jnp.where(flat, incl - 1, s + pos)  # distinct; >= m is dropped
    ids = jnp.zeros((flat.shape[0], m), jnp.int32).at[jnp.arange(flat.shape[0])[:, None], slot].set(
        jnp.broadcast_to(pos, slot.shape), mode="drop", unique_indices=True)
    counts = jnp.minimum(incl[:, -1], m).astype(jnp.int32)
    last = jnp.take_along_axis(ids, jnp.maximum(counts - 1, 0)[:, None], axis=-1)
    ids = jnp.where(jnp.arange(m) < counts[:, None], ids, jnp.where(counts[:, None] > 0, last, 0))
    return ids.reshape(*lead, m), counts.reshape(lead)


def zero_cotangent(plan: BlockPlan):
    """The cotangent of a plan in a custom VJP: float0 zeros for its integer arrays (a plan is a selection; the
    differentiable backends never differentiate it)."""
    return jax.tree.map(lambda x: np.zeros(jnp.shape(x), jax.dtypes.float0), plan)


def kernel_plan_args(plan: BlockPlan, q_len: int, kv_len: int) -> tuple[jax.Array, ...]:
    """Flattened int32 (kv_blocks, counts, sinks, window, kv_len, query starts [B]) for a Pallas kernel, after
    checking that the lengths are whole blocks (the kernels assume it; `sparse_attention.api` pads). The query
    starts include the static q_offset, so kernels use them alone."""
    if q_len % plan.q_block or kv_len % plan.kv_block:
        raise ValueError(f"T={q_len} and S={kv_len} must be multiples of q_block={plan.q_block} / "
                         f"kv_block={plan.kv_block} (sparse_attention.api pads)")
    return tuple(x.reshape(-1).astype(jnp.int32)
                 for x in (plan.kv_blocks, plan.counts, plan.sinks, plan.window, plan.kv_len, plan.query_starts()))
