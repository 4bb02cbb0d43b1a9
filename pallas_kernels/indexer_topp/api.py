"""Indexer scoring + exact top-p block selection with a backend choice: at decode (`decode_selection`,
`decode_plan_select`) and per prefill tile (`prefill_selection`).

backend "reference": `reference.topp_selection_at` (XLA; scores all [B, R, S] tokens, then block stats).
backend "triton": the fused Pallas scoring + block log-sum-exp kernel (`triton.py`), then the same exact
sort-based top-p on the [B, R, Sb] block masses (`decode_plan_select`: the sort-free top-p + packing kernels).
backend "xla": XLA scoring and the sort-free exact top-p by bisection (`xla.py`; XLA sorts are slow on TPUs).
None picks triton on GPUs, xla on TPUs, the reference elsewhere (logged). All return the same selection
(tested; triton in interpret mode); scoring and mass sums differ only in rounding.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_plan import FULL_WINDOW, band_blocks, cdiv
from pallas_kernels.indexer_topp.reference import (forced_blocks, tile_bounds, tile_masses, topp_select,
                                                   topp_selection_at)
from pallas_kernels.sparse_attention.api import _check_backend

log = logging.getLogger(__name__)


BACKENDS = ("reference", "triton", "xla")


def default_backend(platform: str | None = None) -> str:
    """The backend None resolves to: triton on GPUs, xla on TPUs, the reference elsewhere."""
    return {"gpu": "triton", "cuda": "triton", "tpu": "xla"}.get(platform or jax.default_backend(), "reference")


def _pick_backend(backend: str | None, top_p: float, interpret: bool, what: str) -> str:
    """Check top_p and the backend name (this op's own table); resolve None for the device and log it."""
    if not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if backend is None:
        backend = default_backend()
        log.info("%s: backend=%s (platform %s)", what, backend, jax.default_backend())
    if backend not in BACKENDS:
        raise ValueError(f"{what}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":  # the only backend that needs a device (reference and xla run anywhere)
        _check_backend(backend, interpret)
    return backend


def add_local_bias(lse, forced, local_bias):
    """Block log-masses fp32 [B, R, Sb] with the local prior local_bias [B, R] added where forced [B, 1, Sb]."""
    if local_bias is None:
        return lse
    return lse + jnp.where(forced, local_bias[..., None], 0.0)


def check_key_slot(key_slot, num_heads: int, num_slots: int) -> None:
    """Raise unless key_slot (None, or a static int per retrieval head) maps num_heads heads into num_slots slots."""
    if key_slot is None:
        if num_heads != num_slots:
            raise ValueError(f"{num_heads} index queries but {num_slots} index-key slots: pass key_slot")
        return
    if len(key_slot) != num_heads or not all(0 <= j < num_slots for j in key_slot):
        raise ValueError(f"key_slot must give each of the {num_heads} retrieval heads a slot in [0, {num_slots}), "
                         f"got {tuple(key_slot)}")


def expand_slots(k_idx, key_slot):
    """Index keys [..., S, K, I] of K shared slots as one row per retrieval head [..., S, R, I] (a gather: a copy;
    the reference / xla paths and prefill, where the copy is small next to the work). key_slot None: k_idx."""
    return k_idx if key_slot is None else k_idx[..., jnp.asarray(key_slot, jnp.int32), :]


def _grouped_queries(key_slot, num_slots: int):
    """Static (idx int [K, Gp], slot int [R], rank int [R]): the queries of each key slot, padded to a power of two
    Gp with index R (a zero query), and where each head's row lands in the [K, Gp] grid."""
    slot = np.asarray(key_slot, np.int64)
    members = [np.flatnonzero(slot == j) for j in range(num_slots)]
    gp = 1 << (max(1, max(len(m) for m in members)) - 1).bit_length()
    idx = np.full((num_slots, gp), len(slot), np.int64)
    rank = np.zeros(len(slot), np.int64)
    for j, m in enumerate(members):
        idx[j, :len(m)] = m
        rank[m] = np.arange(len(m))
    return idx, slot, rank


def _block_lse(q_idx, k_idx, kv_len, kv_block: int, bpp: int, interpret: bool, layer=None, key_slot=None):
    """fp32 [B, R, Sb]: the fused scoring kernel's block log-sum-exps over the index keys k_idx [B, S, R, I]
    (or layer `layer` of a stack [L, B, S, R, I]), read in place. Blocks per program = the largest power of two
    <= bpp that divides Sb, so the keys need no padded copy (a copy of the whole index cache per decode step,
    measured at 0.4 ms per 4 layers at 512K B=1 on an H200); only S not a multiple of kv_block pads. key_slot:
    k_idx holds K shared slots [.., S, K, I] and head r reads slot key_slot[r]; the kernel then scores each slot's
    heads together (grouped queries), reading each key once per slot."""
    from pallas_kernels.indexer_topp.triton import block_lse_triton

    if key_slot is not None:
        idx, slot, rank = _grouped_queries(key_slot, k_idx.shape[-2])
        q_pad = jnp.concatenate([q_idx, jnp.zeros_like(q_idx[:, :1])], axis=1)  # row R: the padding query
        lse = _block_lse(q_pad[:, jnp.asarray(idx)], k_idx, kv_len, kv_block, bpp, interpret, layer)
        return lse[:, jnp.asarray(slot), jnp.asarray(rank)]  # [B, K, Gp, Sb] -> [B, R, Sb]

    s = k_idx.shape[-3]
    sb = cdiv(s, kv_block)
    if s % kv_block:
        k_idx, layer = _layer_of(k_idx, layer), None
        k_idx = jnp.pad(k_idx, ((0, 0), (0, sb * kv_block - s), (0, 0), (0, 0)))
    per = 1
    while per * 2 <= bpp and sb % (per * 2) == 0:
        per *= 2
    return block_lse_triton(q_idx, k_idx, kv_len, layer=layer, kv_block=kv_block, bpp=per, interpret=interpret)


def _layer_of(k_idx, layer):
    """k_idx itself, or its layer `layer` (a slice: a copy) when it is a stack [L, B, S, R, I]."""
    return k_idx if layer is None else jax.lax.dynamic_index_in_dim(k_idx, layer, keepdims=False)


def decode_selection(q_idx, k_idx, kv_len, *, top_p: float, kv_block: int, sinks: int = 0, keep_recent: int = 64,
                     max_blocks: int | None = None, backend: str | None = None, interpret: bool = False,
                     bpp: int = 8, local_bias=None, layer=None, key_slot=None):
    """bool [B, R, Sb]: each decode token's top-p blocks.

    q_idx fp32 [B, R, I] (the token at position kv_len - 1), k_idx [B, S, R, I], kv_len int [B]. local_bias fp32
    [B, R] or None: the local prior added to the forced blocks' log-mass (`reference` module docstring).
    layer: None, or int32 [] (may be traced): k_idx is a stacked index cache [L, B, S, R, I] scored at that
    layer — in place by the triton kernel, through a slice (a copy) by the others. key_slot: None, or a static
    int per head: k_idx holds K shared slots [B, S, K, I] (`--share-index-keys`) and head r scores against slot
    key_slot[r] (triton and xla read them as stored; the reference gathers one row per head).
    """
    backend = _pick_backend(backend, top_p, interpret, "decode_selection")
    check_key_slot(key_slot, q_idx.shape[1], k_idx.shape[-2])
    kv_len = jnp.asarray(kv_len, jnp.int32)
    if backend != "triton":
        k_idx, layer = _layer_of(k_idx, layer), None
    if backend == "reference":
        k_idx, key_slot = expand_slots(k_idx, key_slot), None
    s = k_idx.shape[-3]
    if backend == "reference":
        return topp_selection_at(q_idx[:, None], k_idx, (kv_len - 1)[:, None], kv_len, top_p=top_p, tile=1,
                                 kv_block=kv_block, sinks=sinks, keep_recent=keep_recent, max_blocks=max_blocks,
                                 local_bias=None if local_bias is None else local_bias[:, None])[:, :, 0]
    sb = cdiv(s, kv_block)
    if backend == "xla":
        from pallas_kernels.indexer_topp.xla import block_lse_xla

        lse = block_lse_xla(q_idx, k_idx, kv_len, kv_block, key_slot)
    else:
        lse = _block_lse(q_idx, k_idx, kv_len, kv_block, bpp, interpret, layer, key_slot)
    forced = forced_blocks(kv_len - 1, kv_len - 1, sb, kv_block, sinks, keep_recent)[:, None]  # [B, 1, Sb]
    lse = add_local_bias(lse, forced, local_bias)
    tot = jax.nn.logsumexp(lse, axis=-1, keepdims=True)
    mass = jnp.where(jnp.isfinite(lse), jnp.exp(lse - jnp.where(jnp.isfinite(tot), tot, 0.0)), 0.0)
    if backend == "xla" and max_blocks is None:
        from pallas_kernels.indexer_topp.xla import topp_select_sortfree

        return topp_select_sortfree(mass, jnp.isfinite(lse), forced, top_p)
    return topp_select(mass, jnp.isfinite(lse), forced, top_p, max_blocks)


def prefill_selection(q_idx, k_idx, q_pos, kv_len, *, tile: int, top_p: float, kv_block: int, sinks: int = 0,
                      keep_recent: int = 64, max_blocks: int | None = None, local_bias=None,
                      backend: str | None = None, interpret: bool = False, key_slot=None):
    """bool [B, R, C / tile, Sb]: the top-p key blocks of each tile of `tile` query rows (indexer-mode prefill).
    key_slot: as in `decode_selection` (here every backend gathers one row of keys per head first).

    q_idx fp32 [B, C, R, I] (C a multiple of tile), k_idx [B, S, R, I], q_pos int [B, C] (-1: padding row),
    kv_len int [B], local_bias fp32 [B, C, R] or None. backend "reference": `reference.topp_selection_at` (token
    scores per tile in a `lax.map`, sort-based top-p); "xla": the same masses, the sort-free top-p over all tiles
    at once; "triton": every tile's block masses in one kernel (`prefill_triton.py`, scores never leave
    registers), then the sort-free top-p. With `max_blocks` the sort-based selection runs on the masses.
    """
    backend = _pick_backend(backend, top_p, interpret, "prefill_selection")
    check_key_slot(key_slot, q_idx.shape[2], k_idx.shape[-2])
    k_idx = expand_slots(k_idx, key_slot)
    kv_len = jnp.asarray(kv_len, jnp.int32)
    opts = dict(tile=tile, kv_block=kv_block, sinks=sinks, keep_recent=keep_recent)
    if backend == "reference":  # the XLA paths score in fp32; the kernel reads the keys as stored
        return topp_selection_at(q_idx, k_idx.astype(jnp.float32), q_pos, kv_len, top_p=top_p,
                                 max_blocks=max_blocks, local_bias=local_bias, **opts)
    if backend == "xla":
        mass, visible, forced = tile_masses(q_idx, k_idx.astype(jnp.float32), q_pos, kv_len, local_bias=local_bias,
                                            **opts)
    else:
        from pallas_kernels.indexer_topp.prefill_triton import tile_block_mass_triton

        b, c = q_idx.shape[:2]
        s = k_idx.shape[1]
        sb = cdiv(s, kv_block)
        pos, q_hi, forced = tile_bounds(jnp.broadcast_to(jnp.asarray(q_pos, jnp.int32), (b, c)), kv_len, tile=tile,
                                        num_kv_blocks=sb, kv_block=kv_block, sinks=sinks, keep_recent=keep_recent)
        if s % kv_block:
            k_idx = jnp.pad(k_idx, ((0, 0), (0, sb * kv_block - s), (0, 0), (0, 0)))
        mass = tile_block_mass_triton(q_idx, k_idx, pos, kv_len, forced, local_bias, tile=tile, kv_block=kv_block,
                                      interpret=interpret)
        visible = (jnp.arange(sb) * kv_block <= q_hi[..., None])[:, None]  # [B, 1, Tb, Sb]
        forced = forced[:, None]
    if max_blocks is not None:
        return topp_select(mass, visible, forced, top_p, max_blocks)
    from pallas_kernels.indexer_topp.xla import topp_select_sortfree

    return topp_select_sortfree(mass, visible, forced, top_p)


def decode_plan_select(q_idx, k_idx, kv_len, *, retrieval: tuple[int, ...], num_kv_heads: int, head_sinks,
                       head_window, top_p: float, kv_block: int, sinks: int = 0, keep_recent: int = 64,
                       dense=None, max_blocks: int | None = None, backend: str | None = None,
                       interpret: bool = False, bpp: int = 8, local_bias=None, active=None, layer=None,
                       key_slot=None):
    """The DecodePlan of one decode step for N query heads (G = N / num_kv_heads per group), from index keys.

    q_idx fp32 [B, R, I] and k_idx [B, S, R, I]: the R retrieval heads, which sit at rows `retrieval` (static)
    of the N heads; the other heads are local: `head_sinks` / `head_window` int [N] give their band (entries of
    retrieval rows are ignored). kv_len int [B] (the query sits at kv_len - 1). dense: optional bool [B], rows
    whose retrieval heads keep every visible block (below `seqlen_threshold`). local_bias fp32 [B, R] or None:
    the local prior (`decode_selection`). active: None, or bool [R] (traced): the rows that select; the others
    (a stacked cache's padded slots whose head is local in this layer) take their band like local heads.
    backend "reference": exact sort-based top-p (XLA) + `decode_plan`; "triton": the fused scoring kernel, then
    the sort-free top-p and packing kernels (`plan_triton.py`) — three launches from index keys to the plan. With
    `max_blocks` (a per-head cap the kernel does not implement) triton scores and XLA selects and packs.
    layer: None, or int32 [] (may be traced): k_idx is a stacked index cache [L, B, S, R, I] (`decode_selection`).
    key_slot: None, or a static int per retrieval head — k_idx holds shared key slots (`decode_selection`).
    """
    from pallas_kernels.sparse_decode.plan import DecodePlan, decode_plan

    backend = _pick_backend(backend, top_p, interpret, "decode_plan_select")
    n = len(head_sinks)
    b, s = q_idx.shape[0], k_idx.shape[-3]
    sb = cdiv(s, kv_block)
    kv_len = jnp.asarray(kv_len, jnp.int32)
    is_r = jnp.zeros((n,), bool).at[jnp.asarray(retrieval, jnp.int32)].set(True if active is None else active)
    plan_sinks = jnp.where(is_r, 0, jnp.asarray(head_sinks, jnp.int32))
    plan_window = jnp.where(is_r, FULL_WINDOW, jnp.asarray(head_window, jnp.int32))
    dense = jnp.zeros((b,), bool) if dense is None else jnp.asarray(dense, bool)
    if backend in ("reference", "xla") or max_blocks is not None:
        sel_r = decode_selection(q_idx, k_idx, kv_len, top_p=top_p, kv_block=kv_block, sinks=sinks,
                                 keep_recent=keep_recent, max_blocks=max_blocks, backend=backend,
                                 interpret=interpret, bpp=bpp, local_bias=local_bias,
                                 layer=layer, key_slot=key_slot) | dense[:, None, None]
        q_pos = (kv_len - 1)[:, None]
        causal = band_blocks(q_pos, q_pos, sb, kv_block, 0, FULL_WINDOW)  # [B, 1, Sb]
        band = band_blocks(q_pos, q_pos, sb, kv_block, plan_sinks, plan_window)  # [B, N, Sb]
        rows = jnp.asarray(retrieval, jnp.int32)
        sel = band.at[:, rows].set(jnp.where(is_r[rows][None, :, None], sel_r & causal, band[:, rows]))
        return decode_plan(sel, num_kv_heads, sinks=plan_sinks, window=plan_window, kv_len=kv_len,
                           kv_block=kv_block)
    from pallas_kernels.indexer_topp.plan_triton import decode_plan_triton

    sbp = 1 << (sb - 1).bit_length()
    check_key_slot(key_slot, q_idx.shape[1], k_idx.shape[-2])
    lse = _block_lse(q_idx, k_idx, kv_len, kv_block, bpp, interpret, layer, key_slot)
    lse = jnp.pad(lse, ((0, 0), (0, 0), (0, sbp - sb)), constant_values=-jnp.inf)  # [B, R, Sbp]
    lse = add_local_bias(lse, forced_blocks(kv_len - 1, kv_len - 1, sbp, kv_block, sinks, keep_recent)[:, None],
                         local_bias)
    rows = jnp.full((b, n, sbp), -jnp.inf, jnp.float32).at[:, jnp.asarray(retrieval, jnp.int32)].set(lse)
    g, kh = n // num_kv_heads, num_kv_heads
    gp = 1 << (g - 1).bit_length()  # the kernel wants a power-of-two group: pad with heads that select nothing
    pad_heads = lambda x, fill: jnp.pad(x.reshape(kh, g, *x.shape[1:]), ((0, 0), (0, gp - g)) + ((0, 0),) *
                                        (x.ndim - 1), constant_values=fill).reshape(kh * gp, *x.shape[1:])
    rows = jax.vmap(lambda r: pad_heads(r, -jnp.inf))(rows)
    blocks, counts, hm = decode_plan_triton(rows, pad_heads(is_r.astype(jnp.int32), 0), pad_heads(plan_sinks, 0),
                                            pad_heads(plan_window, -(1 << 30)), kv_len, dense.astype(jnp.int32),
                                            num_kv_heads=kh, top_p=top_p, kv_block=kv_block, sinks=sinks,
                                            keep_recent=keep_recent, interpret=interpret)
    return DecodePlan(kv_blocks=blocks, counts=counts, head_mask=jnp.moveaxis(hm[:, :, :g], 2, 3) != 0,
                      sinks=plan_sinks, window=plan_window, kv_len=kv_len, kv_block=kv_block)
