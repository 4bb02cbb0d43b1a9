"""The one planner: head roles + `SparseConfig` + query positions + key length -> `BlockPlan` / `DecodePlan`.

Every attention call of the library (the full-sequence forward of training and `lm.apply`, a serving prefill
chunk, a decode step) plans here, and every backend — the jnp reference included — consumes the plan:

    roles ─┐
    config ├─> dense_call (seqlen_threshold) ─> local band (sinks, window) ─┐
    q_pos ─┘   retrieval selection (indexer / oracle top-p per tile, or dense) ┴─> merge_roles ─> BlockPlan
                                                                               └─> decode_plan ─> DecodePlan

Semantics, documented once (RTPurbo §3-§5, RTP-LLM's `seqlen_threshold`):
- a **local head** sees `sinks` + the last `window` tokens;
- a **retrieval head** sees every causal key in prefill (`prefill_mode="dense"`, the paper), or the top-p blocks
  of its indexer per tile of `q_block` rows (`"indexer"`); at decode its own top-p blocks;
- a call whose sequences are all shorter than `seqlen_threshold` runs **every head dense** (RTP-LLM's switch).
  The decision is per call (the longest row of the batch decides), because a plan holds one band per head.

The decode top-p kernel (`pallas_kernels.indexer_topp.plan_triton`) fuses selection, the role merge and packing
for speed; `tests/test_planner.py` pins it to `decode_plan` with the reference selection.

Axes: B batch, C query rows of the call, N' planned heads, R retrieval heads among them, Tb / Sb query / key
blocks, I index_dim (H for the oracle).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_plan import FULL_WINDOW, BlockPlan, band_blocks, cdiv, plan_from_selection
from pallas_kernels.indexer_topp.api import decode_plan_select, prefill_selection
from pallas_kernels.sparse_decode.plan import DecodePlan, decode_plan
from rtpurbo_jax.model_config import ModelConfig
from rtpurbo_jax.sparse_config import SparseConfig


def dense_call(sparse: SparseConfig | None, total_len) -> jax.Array:
    """bool []: True when every sequence of the call is shorter than `seqlen_threshold` (all heads dense).

    total_len int [B]: each sequence's length after this call."""
    if sparse is None or sparse.seqlen_threshold <= 0:
        return jnp.asarray(False)
    return jnp.max(jnp.asarray(total_len, jnp.int32)) < sparse.seqlen_threshold


def local_band(sparse: SparseConfig | None, cfg: ModelConfig, dense) -> tuple[jax.Array, jax.Array]:
    """(sinks, window) int32 [] of the local heads for this call: the config's band, or dense causal when
    `dense` (below the threshold). Without a SparseConfig: the model's own sliding window, if any."""
    if sparse is None:
        return jnp.int32(0), jnp.int32(cfg.sliding_window or FULL_WINDOW)
    return (jnp.where(dense, 0, sparse.sinks).astype(jnp.int32),
            jnp.where(dense, FULL_WINDOW, sparse.window).astype(jnp.int32))


def retrieval_selection(q_sel, k_sel, bias, q_pos, valid, kv_len, sparse: SparseConfig, *, tile: int, dense,
                        backend: str = "reference", interpret: bool = False, key_slot=None):
    """bool [B, R, C / tile, Sb]: the key blocks each retrieval head's query tiles visit (top-p, or all when
    `dense`). q_sel fp32 [B, C, R, X], k_sel [B, S, R, X], bias fp32 [B, C, R] or None (`selection_inputs`);
    q_pos int [B, C]; valid bool [B, C]; kv_len int [B] keys written so far. A last partial tile is padded.
    backend: `pallas_kernels.indexer_topp.api.prefill_selection`'s ("triton": every tile's block masses in one
    kernel; "xla": sort-free top-p; "reference": the definition). key_slot: None, or static int [R] — k_sel holds
    one key slot per KV group [B, S, K, X] (`prefill_selection`)."""
    pad = cdiv(q_pos.shape[1], tile) * tile - q_pos.shape[1]
    if pad:
        rows = lambda x, fill: jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2), constant_values=fill)
        q_sel, q_pos, valid = rows(q_sel, 0), rows(q_pos, -1), rows(valid, False)
        bias = None if bias is None else rows(bias, 0)
    sel = prefill_selection(q_sel, k_sel, jnp.where(valid, q_pos, -1), kv_len, tile=tile, top_p=sparse.top_p,
                            kv_block=sparse.kv_block, sinks=sparse.sinks, keep_recent=sparse.keep_recent,
                            max_blocks=sparse.max_blocks, local_bias=bias, backend=backend, interpret=interpret,
                            key_slot=key_slot)
    return sel | dense


def roles_of(is_r, rows: tuple[int, ...] | None, active=None):
    """bool [N'] (traced when `active` is): the heads that plan as retrieval heads — `is_r`, with the retrieval
    slots `rows` switched by `active` bool [R] when given (a stacked cache's padded slots: a slot whose head is
    local in this layer plans as a local head)."""
    if active is None or not rows:
        return is_r
    return jnp.asarray(is_r).at[jnp.asarray(rows)].set(active)


def merge_roles(band, causal, sel_r, is_r, rows: tuple[int, ...] | None, active=None):
    """bool [B, N', Tb, Sb]: each head's blocks — its band for local heads, its selection (or every causal
    block) for retrieval heads.

    band, causal: bool [B, Tb, Sb]; sel_r: bool [B, R, Tb, Sb] or None (retrieval heads dense); is_r: bool [N']
    (numpy or traced); rows: the static positions of the R selected heads among the N', or None when sel_r
    covers all N' heads (roles traced, as in the scanned forward); active: None, or bool [R] (traced) — slots
    that are local heads in this layer take their band (`roles_of`)."""
    n = is_r.shape[0]
    b, tb, sb = band.shape
    retr = causal[:, None] if sel_r is None else sel_r & causal[:, None]
    if rows is None:
        return jnp.where(jnp.asarray(is_r)[None, :, None, None], retr, band[:, None])
    out = jnp.broadcast_to(band[:, None], (b, n, tb, sb))
    if not rows:
        return out
    if active is not None:
        retr = jnp.where(jnp.asarray(active)[None, :, None, None], retr, band[:, None])
    return out.at[:, jnp.asarray(rows)].set(jnp.broadcast_to(retr, (b, len(rows), tb, sb)))


def head_band(is_r, sinks, window):
    """(sinks, window) int32 [N']: the token band inside visited blocks — none for retrieval heads."""
    is_r = jnp.asarray(is_r)
    return jnp.where(is_r, 0, sinks).astype(jnp.int32), jnp.where(is_r, FULL_WINDOW, window).astype(jnp.int32)


def chunk_plan(is_r, rows, sel_r, q_start, num_rows: int, num_keys: int, kv_len, sinks, window, *, q_block: int,
               kv_block: int, active=None) -> BlockPlan:
    """The BlockPlan of C = num_rows contiguous query rows per sequence starting at q_start int [B], over
    num_keys keys of which kv_len int [B] are valid. sel_r: retrieval blocks per tile of q_block rows (or None:
    dense); sinks / window: the local band (`local_band`). is_r, rows, active: as `merge_roles`."""
    tb, sb = cdiv(num_rows, q_block), cdiv(num_keys, kv_block)
    q_lo = jnp.asarray(q_start, jnp.int32)[:, None] + jnp.arange(tb, dtype=jnp.int32) * q_block  # [B, Tb]
    q_hi = q_lo + q_block - 1
    band = band_blocks(q_lo, q_hi, sb, kv_block, sinks, window)
    causal = band_blocks(q_lo, q_hi, sb, kv_block, 0, FULL_WINDOW)
    sel = merge_roles(band, causal, sel_r, is_r, rows, active)
    h_sinks, h_window = head_band(roles_of(is_r, rows, active), sinks, window)
    return plan_from_selection(sel, sinks=h_sinks, window=h_window, kv_len=kv_len, q_block=q_block,
                               kv_block=kv_block, q_start=q_start)


def decode_step_plan(is_r: np.ndarray, q_sel, k_sel, bias, kv_len, sinks, window, sparse: SparseConfig | None, *,
                     num_kv_heads: int, num_keys: int, dense, selection_backend: str = "reference",
                     interpret: bool = False, active=None, layer=None, key_slot=None) -> DecodePlan:
    """The DecodePlan of one decode token per sequence (at kv_len - 1) for N' heads of num_kv_heads groups.

    is_r: static bool [N']; q_sel fp32 [B, R, X] / k_sel [B, S, R, X] / bias fp32 [B, R] or None: the retrieval
    heads' selection inputs, or q_sel None when they run dense. selection_backend "triton": the fused scoring +
    sort-free top-p + packing kernels (`decode_plan_select`); "xla": the sort-free top-p in XLA (TPUs);
    "reference": exact sort-based selection. active: None or bool [R] (traced): as `merge_roles`. layer: None,
    or int32 [] — k_sel is a stacked index cache [L, B, S, R, X] planned at that layer (`decode_plan_select`).
    key_slot: None, or static int [R] — k_sel holds one key slot per KV group (`decode_plan_select`)."""
    kv_block = sparse.kv_block if sparse is not None else 64
    rows = tuple(int(i) for i in np.flatnonzero(is_r))
    n = len(is_r)
    if q_sel is not None:
        return decode_plan_select(q_sel, k_sel, kv_len, retrieval=rows, num_kv_heads=num_kv_heads,
                                  head_sinks=jnp.broadcast_to(sinks, (n,)), head_window=jnp.broadcast_to(window, (n,)),
                                  top_p=sparse.top_p, kv_block=kv_block, sinks=sparse.sinks,
                                  keep_recent=sparse.keep_recent, dense=jnp.broadcast_to(dense, kv_len.shape),
                                  max_blocks=sparse.max_blocks, interpret=interpret, local_bias=bias,
                                  backend=selection_backend, active=active, layer=layer, key_slot=key_slot)
    q_pos = kv_len - 1
    sb = cdiv(num_keys, kv_block)
    band = band_blocks(q_pos, q_pos, sb, kv_block, sinks, window)[:, None]  # [B, 1, Sb]
    causal = band_blocks(q_pos, q_pos, sb, kv_block, 0, FULL_WINDOW)[:, None]
    sel = merge_roles(band, causal, None, np.asarray(is_r), rows, active)[:, :, 0]
    h_sinks, h_window = head_band(roles_of(np.asarray(is_r), rows, active), sinks, window)
    return decode_plan(sel, num_kv_heads, sinks=h_sinks, window=h_window, kv_len=kv_len, kv_block=kv_block)


def visited_fraction(plan: DecodePlan, rows: tuple[int, ...], kv_len, active=None) -> jax.Array | None:
    """fp32 [B]: the mean over heads `rows` (those of them `active` bool [R] marks, when given) of the fraction
    of visible key blocks a decode plan visits; None without rows."""
    if not rows:
        return None
    b, k, m = plan.counts.shape + (plan.head_mask.shape[2],)
    used = plan.head_mask & (jnp.arange(m)[None, None, :, None] < plan.counts[..., None, None])
    per_head = used.sum(2).reshape(b, -1)  # [B, N'] blocks each head visits
    frac = per_head[:, jnp.asarray(rows)] / cdiv(jnp.asarray(kv_len), plan.kv_block)[:, None]
    if active is None:
        return frac.mean(-1)
    w = jnp.asarray(active, frac.dtype)
    return (frac * w).sum(-1) / jnp.maximum(w.sum(), 1.0)


__all__ = ["chunk_plan", "decode_step_plan", "dense_call", "head_band", "local_band", "merge_roles",
           "retrieval_selection", "roles_of", "visited_fraction"]
