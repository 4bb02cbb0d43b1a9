"""Serving's layers scanned over a stacked hybrid cache (`init_cache(..., scan=True | "split" | "padded" | "uniform")`).

`serving` runs the layers of an unstacked cache as an unrolled loop; for a stacked cache it calls `scan_layers`:
one `lax.scan` over layers whose attention switches over the cache's groups of layers (`CacheLayout.groups`),
so that one attention body compiles per group. Why the rows are written after the switch and what scanning
costs on GPUs: the `serving` module docstring and `benchmarks/results/scan_probe_h200_padded/`.

Axes: B batch, C query rows of the call, L layers, N query heads, K KV heads, H head_dim, I index_dim.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from rtpurbo_jax import indexer as ixr
from rtpurbo_jax.attention import Positions, cached_attention, in_place_ok, local_slots, new_rows
from rtpurbo_jax.kv_cache import LayerCache
from rtpurbo_jax.model import decoder_layer
from rtpurbo_jax.model_config import ModelConfig


def scan_layers(params, caches, x, cos, sin, pos: Positions, indexer, cfg: ModelConfig, sparse, call, layout):
    """`lax.scan` over layers for a stacked cache (`init_cache(..., scan=...)`): one layer body, whose attention
    switches over the groups (`layout.groups`): one attention compiled per group. The layer's heads are permuted
    into its group's shared layout (`LayerLayout.perms`; the output permuted back before wo); the branch runs
    `cached_attention` on the layer's slice of its group's buffer and returns no buffer (a branch that returns a
    stack, even unchanged, makes XLA copy it); the layer's new K / V / index-key rows are then scattered into its
    stack in place (`_write_rows`; the other groups' stacks get an out-of-range slot: nothing written); the rows
    (`attention.new_rows`) are computed once, outside the switch, and handed to `cached_attention`. With
    `scan="padded"` / `"uniform"` the layer's active retrieval slots (`LayerLayout.active`) ride along as data.

    Decode steps (`attention.in_place_ok`) read the layer's full-KV and index buffers in place: their new rows
    are written into the stacks *before* the switch and the kernels read layer `si` of the stack
    (`cached_attention(..., layer=si)`), so no slice of a layer's whole cache is copied per step; only the small
    sink / ring buffers of local KV heads are sliced (and written after the switch, as the ring needs)."""
    groups = layout.groups
    canon = [layout.stacked(ids[0]) for ids in groups]
    group_of, slot_of = np.asarray([layout.slot(i) for i in range(len(layout.layers))], np.int32).T
    perms = [ll.perms() for ll in layout.layers]
    q_perm = jnp.asarray(np.stack([p[0] for p in perms]))
    kv_perm = jnp.asarray(np.stack([p[1] for p in perms]))
    inv_q = jnp.asarray(np.stack([np.argsort(p[0]) for p in perms]).astype(np.int32))
    slots = max(len(cl.retrieval_q) for cl in canon)
    # the padded layout's active retrieval slots per layer; the other layouts carry none (zero width)
    active = jnp.asarray(np.stack([np.pad(ll.active(), (0, slots - len(ll.active()))) if layout.padded
                                   else np.ones(0, bool) for ll in layout.layers]).reshape(len(layout.layers), -1))
    rows_at = local_slots(layout, pos)
    b = x.shape[0]
    in_place = in_place_ok(sparse, call)
    first, then = (FULL_ROWS, LOCAL_ROWS) if in_place else ((), FULL_ROWS + LOCAL_ROWS)  # rows written before / after

    def branch(g):
        cl = canon[g]

        def run(qkv, caches, si, act, ixs, rows):
            stack = caches[g]
            if in_place:  # the full-KV stacks whole (the kernels index them), the local buffers sliced
                lc = dataclasses.replace(stack, **{f: getattr(stack, f)[si] for f in LOCAL_BUFFERS})
            else:
                lc = jax.tree.map(lambda a: a[si], stack)
            act = act[:len(cl.retrieval_q)] if layout.padded else None
            out, _, frac = cached_attention(qkv, lc, cl, layout, cfg, sparse, ixs[g], pos, call, act, rows[g],
                                            layer=si if in_place else None)
            # a layer that reports none: no retrieval slot, or (scan="uniform") none of its slots active
            has = jnp.float32(frac is not None) * (jnp.any(act) if act is not None else True)
            return out, jnp.zeros((b,), jnp.float32) if frac is None else frac.astype(jnp.float32), has
        return run

    branches = [branch(g) for g in range(len(groups))]

    def body(carry, xs):
        x, caches, frac_sum, n_frac = carry
        lp, li, gi, si, qp, kp, iq, act = xs

        def attend(qkv):
            qkv = {k: jnp.take(v, qp if k in ("q", "q_pre") else kp, axis=2) for k, v in qkv.items()}
            ixs = [ixr.layer_rows(indexer, li, qp[np.asarray(cl.retrieval_q, np.int32)], cfg.head_dim,
                                  layout.index_dim) for cl in canon]
            rows = [new_rows(qkv, cl, ix) for cl, ix in zip(canon, ixs)]  # each group's layout; one used, below
            at = [jnp.where(gi == g, si, len(groups[g])) for g in range(len(groups))]  # out of range: no write
            new = tuple(_write_rows(caches[g], rows[g], at[g], pos, rows_at, first) for g in range(len(groups)))
            out, frac, has = jax.lax.switch(gi, branches, qkv, new, si, act, ixs, rows)
            new = tuple(_write_rows(new[g], rows[g], at[g], pos, rows_at, then) for g in range(len(groups)))
            return jnp.take(out, iq, axis=2), (new, frac, has)

        x, _, (caches, frac, has) = decoder_layer(lp, x, cfg, cos, sin, attend)
        return (x, caches, frac_sum + frac, n_frac + has), None

    xs = (params["layers"], jnp.arange(len(layout.layers), dtype=jnp.int32), jnp.asarray(group_of),
          jnp.asarray(slot_of), q_perm, kv_perm, inv_q, active)
    init = (x, tuple(caches), jnp.zeros((b,), jnp.float32), jnp.float32(0))
    (x, caches, frac_sum, n_frac), _ = jax.lax.scan(body, init, xs)
    return x, caches, frac_sum / jnp.maximum(n_frac, 1.0)


FULL_ROWS = ("k_full", "k_index")  # `_write_rows`' parts: the full KV heads' K / V and the index keys,
LOCAL_ROWS = ("k_local",)  # the local KV heads' sink / ring slots
LOCAL_BUFFERS = ("k_sink", "v_sink", "k_ring", "v_ring")


def _write_rows(stack: LayerCache, rows: dict, slot, pos: Positions, rows_at,
                parts=FULL_ROWS + LOCAL_ROWS) -> LayerCache:
    """A group's stacked buffers with one layer's new rows (`attention.new_rows` in the group's layout) written
    at layer index `slot` (int []; out of range: nothing written), in place: the full KV heads' K / V at their
    positions, the local KV heads' into sink / ring slots (`rows_at` = `attention.local_slots`), the retrieval
    slots' index keys in the cache's dtype — those of `parts` (rows keys: k_full, k_local, k_index)."""
    bi = jnp.arange(pos.q_pos.shape[0])[:, None]
    in_sink, ring_slot, keep = rows_at

    def put(a, new, at, ok):
        return a.at[slot, bi, jnp.where(ok, at, a.shape[2])].set(new.astype(a.dtype), mode="drop")

    q_pos, valid = pos.q_pos, pos.valid
    out = {}
    rows = {k: v for k, v in rows.items() if k.replace("v_", "k_") in parts}
    if "k_full" in rows:
        out.update(k_full=put(stack.k_full, rows["k_full"], q_pos, valid), v_full=put(stack.v_full, rows["v_full"], q_pos, valid))
    if "k_local" in rows:
        k_l, v_l = rows["k_local"], rows["v_local"]
        out.update(k_sink=put(stack.k_sink, k_l, q_pos, in_sink), v_sink=put(stack.v_sink, v_l, q_pos, in_sink),
                   k_ring=put(stack.k_ring, k_l, ring_slot, keep), v_ring=put(stack.v_ring, v_l, ring_slot, keep))
    if "k_index" in rows:
        out["k_index"] = put(stack.k_index, ixr.store_keys(rows["k_index"], stack.k_index.dtype), q_pos, valid)
    return dataclasses.replace(stack, **out)


__all__ = ["scan_layers"]
