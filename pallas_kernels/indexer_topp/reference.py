"""Pure-jnp indexer scoring and dynamic top-p block selection (exact, sort-based): the kernels' reference.

Indexer (RTPurbo §4; the projections are `rtpurbo_jax.indexer`): per retrieval query head n, `w_q[n], w_k[n]: [H, I]` map the **pre-RoPE** q and k
(after Qwen3's q/k norm) to I dims; token score = q_idx · k_idx (no 1/sqrt scale: stage-1 distillation learns
the temperature). A query's distribution over keys is the softmax of its scores over the tokens it may see
(causal, within `kv_len`).

Selection policy (documented choice; the paper is silent):
- *Forced blocks* are always kept and their mass counts toward p: the blocks holding the first `sinks` tokens
  and the blocks overlapping the query tile's last `keep_recent` tokens (its own diagonal at least).
- The remaining visible blocks are added by descending mass until the kept mass reaches `top_p`; the result is
  the smallest such set containing the forced blocks (dropping its lowest-mass added block leaves mass < p).
- `top_p == 1` keeps every visible block. `max_blocks` caps the total (forced first, then by mass).
- Prefill (a tile of q_block queries): block mass = the mean over the tile's queries of each query's mass in
  the block, so one plan serves the whole tile (a kernel tile loads each K/V block once).
- Local prior (optional `local_bias`, fp32 per query row and head): added to the log-mass of the forced blocks
  before normalising. Index scores come from pre-RoPE q and k, so they cannot tell a recent key from a far one;
  the head's attention to its sinks and recent tokens is positional. Stage 1 learns the bias (linear in the
  pre-RoPE query) so that the indexer's forced mass matches the head's and top-p adds only what is missing.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp

from pallas_kernels.block_plan import band_blocks, cdiv

_HI = jax.lax.Precision.HIGHEST


def block_stats(scores, visible, kv_block: int):
    """Per key block max and log-sum-exp of token scores.

    scores fp32 [..., S], visible bool [..., S] -> (max, lse) fp32 [..., Sb]; -inf for blocks with no visible
    token. The last block may be partial (S need not be a multiple of kv_block).
    """
    s = scores.shape[-1]
    sb = cdiv(s, kv_block)
    pad = sb * kv_block - s
    x = jnp.where(visible, scores, -jnp.inf)
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)], constant_values=-jnp.inf)
    x = x.reshape(*x.shape[:-1], sb, kv_block)
    mx = x.max(-1)
    safe = jnp.where(jnp.isfinite(mx), mx, 0.0)
    lse = jnp.log(jnp.exp(x - safe[..., None]).sum(-1)) + safe
    return mx, jnp.where(jnp.isfinite(mx), lse, -jnp.inf)


def topp_select(mass, visible, forced, top_p: float, max_blocks: int | None = None):
    """Smallest set of visible blocks containing `forced` whose mass reaches top_p.

    mass fp32 [..., Sb] (probabilities summing to ~1 over visible blocks), visible/forced bool [..., Sb].
    Returns bool [..., Sb]. Sort-based and exact.
    """
    forced = forced & visible
    if top_p >= 1.0:
        sel = visible
    else:
        base = jnp.where(forced, mass, 0.0).sum(-1, keepdims=True)
        cand = jnp.where(visible & ~forced, mass, -1.0)
        order = jnp.argsort(-cand, axis=-1, stable=True)
        sorted_c = jnp.take_along_axis(cand, order, axis=-1)
        m = jnp.maximum(sorted_c, 0.0)
        before = base + jnp.cumsum(m, axis=-1) - m
        keep_sorted = (before < top_p) & (sorted_c >= 0)
        # kept = the first L entries of the stable descending order; map back without a scatter: everything
        # above the L-th value, plus the lowest-index ties at that value until L is reached
        n_keep = keep_sorted.sum(-1, keepdims=True)
        tau = jnp.take_along_axis(sorted_c, jnp.maximum(n_keep - 1, 0), axis=-1)
        above = (cand > tau) & (cand >= 0)
        tie = (cand == tau) & (cand >= 0)
        tie_rank = jnp.cumsum(tie, axis=-1) - 1
        keep = (n_keep > 0) & (above | (tie & (tie_rank < n_keep - above.sum(-1, keepdims=True))))
        sel = forced | keep
    if max_blocks is not None:
        prio = jnp.where(forced, 2.0, 0.0) + jnp.where(sel, jnp.clip(mass, 0.0, 1.0), -1.0)
        rank = jnp.argsort(jnp.argsort(-prio, axis=-1, stable=True), axis=-1)
        sel = sel & (rank < max_blocks)
    return sel


def _tile_block_mass(q_idx, k_idx, q_pos, kv_len, kv_block, forced=None, local_bias=None):
    """Mean over a tile's queries of each query's softmax mass per key block.

    q_idx [B, C, N, I], k_idx [B, S, N, I], q_pos int [C] or [B, C] (-1 marks padding rows), kv_len [B] -> (mass fp32 [B, N, Sb], visible bool [B, N, Sb]).
    forced bool [B, 1 or N, Sb] and local_bias fp32 [B, C, N] (optional): the local prior added to forced blocks.
    """
    s = k_idx.shape[1]
    scores = jnp.einsum("bcni,bsni->bncs", q_idx, k_idx.astype(jnp.float32), precision=_HI)
    q_pos = jnp.broadcast_to(q_pos, (q_idx.shape[0], q_idx.shape[1]))
    k_pos = jnp.arange(s)
    vis = (k_pos[None, None, None, :] <= q_pos[:, None, :, None]) & \
          (k_pos[None, None, None, :] < kv_len[:, None, None, None])
    _, lse = block_stats(scores, vis, kv_block)  # [B, N, C, Sb]
    if local_bias is not None:
        lse = lse + jnp.where(forced[:, :, None, :], jnp.moveaxis(local_bias, 1, 2)[..., None], 0.0)
    tot = jax.nn.logsumexp(lse, axis=-1, keepdims=True)
    p = jnp.where(jnp.isfinite(lse), jnp.exp(lse - jnp.where(jnp.isfinite(tot), tot, 0.0)), 0.0)
    valid_q = (q_pos >= 0)[:, None, :, None]  # [B, 1, C, 1]
    n_valid = jnp.maximum(valid_q.sum(-2), 1)
    mass = jnp.where(valid_q, p, 0.0).sum(-2) / n_valid
    visible = (jnp.isfinite(lse) & valid_q).any(-2)
    return mass, visible


def forced_blocks(q_lo, q_hi, num_kv_blocks: int, kv_block: int, sinks: int, keep_recent: int):
    """bool [..., Sb]: blocks every plan of a tile keeps — sink blocks, and blocks overlapping
    [q_lo - max(keep_recent, 1) + 1, q_hi] (the tile's own span and the `keep_recent` tokens before it).

    q_lo, q_hi: int arrays [...] (traced is fine): the tile's first and last query positions.
    """
    return band_blocks(jnp.asarray(q_lo), jnp.asarray(q_hi), num_kv_blocks, kv_block, sinks, max(keep_recent, 1))


def tile_bounds(q_pos, kv_len, *, tile: int, num_kv_blocks: int, kv_block: int, sinks: int, keep_recent: int):
    """(q_pos int [B, C] with -1 for rows that are padding or past kv_len, q_hi int [B, C / tile] the last valid
    row's position per tile (-1 when none), forced bool [B, C / tile, Sb] each tile's forced blocks)."""
    b, c = q_pos.shape
    nt = c // tile
    valid = (q_pos >= 0) & (q_pos < kv_len[:, None])
    pos_t = q_pos.reshape(b, nt, tile)
    val_t = valid.reshape(b, nt, tile)
    q_lo = jnp.where(val_t, pos_t, jnp.iinfo(jnp.int32).max).min(-1)
    q_hi = jnp.where(val_t, pos_t, -1).max(-1)
    forced = forced_blocks(q_lo, q_hi, num_kv_blocks, kv_block, sinks, keep_recent)
    return jnp.where(valid, q_pos, -1), q_hi, forced


def tile_masses(q_idx, k_idx, q_pos, kv_len, *, tile: int, kv_block: int, sinks: int = 0, keep_recent: int = 64,
                local_bias=None):
    """(mass fp32 [B, N, C / tile, Sb], visible bool [B, N, C / tile, Sb], forced bool [B, 1, C / tile, Sb]): each
    tile's mean per-row block mass (`_tile_block_mass`, one tile at a time through a `lax.map`: memory
    O(B · N · tile · S)). Arguments as `topp_selection_at`."""
    b, c, n, i = q_idx.shape
    if c % tile:
        raise ValueError(f"{c} query rows are not a whole number of tiles of {tile}")
    sb = cdiv(k_idx.shape[1], kv_block)
    kv_len = jnp.asarray(kv_len, jnp.int32)
    q_pos, _, forced = tile_bounds(jnp.broadcast_to(jnp.asarray(q_pos, jnp.int32), (b, c)), kv_len, tile=tile,
                                   num_kv_blocks=sb, kv_block=kv_block, sinks=sinks, keep_recent=keep_recent)

    def one(j):
        rows = lambda x: jax.lax.dynamic_slice_in_dim(x, j * tile, tile, axis=1)
        bias = None if local_bias is None else rows(local_bias)
        return _tile_block_mass(rows(q_idx), k_idx, rows(q_pos), kv_len, kv_block, forced[:, j][:, None], bias)

    mass, visible = jax.lax.map(one, jnp.arange(c // tile))  # [Tb, B, N, Sb]
    return jnp.moveaxis(mass, 0, 2), jnp.moveaxis(visible, 0, 2), forced[:, None]


def topp_selection_at(q_idx, k_idx, q_pos, kv_len, *, top_p: float, tile: int, kv_block: int, sinks: int = 0,
                      keep_recent: int = 64, max_blocks: int | None = None, local_bias=None):
    """bool [B, N, C / tile, Sb]: top-p selection for queries at traced positions (serving: decode, prefill chunks).

    q_idx fp32 [B, C, N, I]; k_idx fp32 [B, S, N, I] (positions 0..S-1); q_pos int [B, C], -1 for padding rows;
    kv_len int [B]. Each run of `tile` consecutive rows shares one plan (decode: tile=1; prefill: q_block, the
    tiles counted from the first row). Forced blocks come from each row's valid positions. local_bias fp32
    [B, C, N] or None: the local prior (module docstring), added to the tile's forced blocks.
    """
    mass, visible, forced = tile_masses(q_idx, k_idx, q_pos, kv_len, tile=tile, kv_block=kv_block, sinks=sinks,
                                        keep_recent=keep_recent, local_bias=local_bias)
    return topp_select(mass, visible, forced, top_p, max_blocks)
