"""One layer's RTPurbo attention, with or without the hybrid KV cache — the attention every path runs.

`sequence_attention` (no cache: training, calibration, `lm.apply`; roles may be traced, layers scanned) and
`cached_attention` (serving: a prefill chunk or a decode step over the hybrid cache) both go through
`heads_attention`: `rtpurbo_jax.planner` builds one plan, one op (`pallas_kernels.sparse_attention` for query
rows of a prefill, `pallas_kernels.sparse_decode` for a decode token) runs it, for every backend — "reference"
is the jnp implementation of the same op. Semantics are the planner's (documented there once).

In the cache, a layer's KV heads split in two (`kv_cache.LayerLayout`): **full** KV heads (any retrieval
query head) keep every position and go through `heads_attention`; **local** KV heads keep sinks + a ring and
run a masked jnp attention over those few thousand keys in decode (`_local_kv_attention`, the buffers read in
place) and a band plan on the prefill op in prefill chunks (`_local_kv_attention_op`), with the same band.

Axes: B batch, C query rows of the call, S keys, N query heads, K KV heads, G = N / K, H head_dim,
R retrieval heads, I index_dim.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from pallas_kernels.indexer_topp.api import default_backend as selection_default_backend
from pallas_kernels.sparse_attention import api as prefill_op
from pallas_kernels.sparse_attention import reference as prefill_reference
from pallas_kernels.sparse_attention.reference import masked_attention, masked_attention_parts
from pallas_kernels.sparse_decode.api import sparse_decode_attention
from rtpurbo_jax import indexer as ixr
from rtpurbo_jax import planner
from rtpurbo_jax.kv_cache import CacheLayout, LayerCache, LayerLayout, ring_positions
from rtpurbo_jax.model_config import ModelConfig
from rtpurbo_jax.sparse_config import SparseConfig


PLAN_NAME = "attention_plan"  # `checkpoint_name` of every prefill plan (saved across remat)


@dataclasses.dataclass(frozen=True)
class AttentionCall:
    """Static description of one attention call (hashable).

    decode: one token per sequence at position `start_len` (a decode step) — explicit, never inferred from C.
    tile: query rows per retrieval plan (1 in decode; `q_block` in indexer prefill).
    dense_retrieval: retrieval heads skip their selection and see every causal key.
    prefill_backend / decode_backend: the op backends (`pallas_kernels.sparse_attention.api.BACKENDS` /
    `pallas_kernels.sparse_decode.api.BACKENDS`; None: the op picks for the device and logs it).
    chunk: query rows per step of the reference prefill op (memory O(B · N · chunk · S)).
    mesh: None, or a Mesh whose "data" axis splits the batch: `cached_attention` runs per shard (`shard_map`),
    because XLA does not partition a Pallas kernel (serving's `data_parallel_mesh` decides).
    """

    decode: bool = False
    tile: int = 1
    dense_retrieval: bool = True
    prefill_backend: str | None = "reference"
    decode_backend: str | None = "reference"
    interpret: bool = False
    chunk: int = 512
    mesh: object = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Positions:
    """Traced positions of a call: q_pos int32 [B, C] (contiguous per row), valid bool [B, C] (right padding),
    start_len int32 [B] positions cached before the call, total_len int32 [B] each sequence's length after it
    (decides `seqlen_threshold`)."""

    q_pos: jax.Array
    valid: jax.Array
    start_len: jax.Array
    total_len: jax.Array

    @property
    def new_len(self) -> jax.Array:
        """int32 [B]: keys written once this call's valid rows are in."""
        return self.start_len + self.valid.sum(-1).astype(jnp.int32)

    @classmethod
    def sequence(cls, batch: int, length: int, lengths=None) -> "Positions":
        """A whole right-padded sequence from position 0 (no cache)."""
        q_pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        lens = jnp.full((batch,), length, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
        return cls(q_pos, q_pos < lens[:, None], jnp.zeros((batch,), jnp.int32), lens)


def selection_inputs(qkv, keys, ix, k_index, heads_r, kv_r, sparse: SparseConfig):
    """(queries fp32 [B, C, R, X], keys [B, S, R, X], local prior fp32 [B, C, R] or None) scoring the blocks of
    the R retrieval heads at rows heads_r (int [R]) of qkv, whose KV heads are rows kv_r (int [R]) of `keys`
    [B, S, K', H]: the indexer's index queries over its index keys k_index (X = I), or with selector="oracle"
    the head's post-RoPE q / sqrt(H) over its full keys (X = H) — top-p over the exact attention's blocks."""
    if sparse.selector == "oracle":
        h = qkv["q"].shape[-1]
        return qkv["q"][:, :, heads_r].astype(jnp.float32) * h ** -0.5, keys[:, :, kv_r], None
    q_pre = qkv["q_pre"][:, :, heads_r]
    return ixr.project_queries(q_pre, ix["w_q"]), k_index, ixr.local_prior(q_pre, ix)


def selection_backend(op_backend: str | None, indexer: bool) -> str:
    """The indexer selection backend (`pallas_kernels.indexer_topp.api`) that goes with an attention op's backend:
    the Triton selection kernels with the GPU ops, the sort-free XLA top-p with Mosaic TPU, else the reference
    (also for the oracle selector). None (the op picks for the device) and the differentiable "xla" op (training
    on any device: the selection is not differentiated) follow the default device."""
    if not indexer:
        return "reference"
    if op_backend is None or op_backend == "xla":
        return selection_default_backend()
    return {"triton": "triton", "mosaic_gpu": "triton", "mosaic_tpu": "xla"}.get(op_backend, "reference")


def heads_attention(q, k, v, is_r, rows, sel, pos: Positions, sparse: SparseConfig | None, cfg: ModelConfig,
                    call: AttentionCall, active=None, sel_heads=None, layer=None, key_slot=None):
    """Attention of N' query heads q [B, C, N', H] over keys k, v [B, S, K', H] holding every position, through
    one plan. is_r bool [N'] (static numpy, or traced with rows=None); rows: static positions of the heads whose
    selection inputs `sel` (from `selection_inputs`) holds, or None for all N'; sel None: retrieval heads dense;
    active: None, or bool [R] (traced) — which of the `rows` are retrieval heads (`planner.roles_of`);
    sel_heads: None, or int [R] (traced; prefill with rows=None) — the heads `sel` covers (repeats allowed).
    layer: None, or int32 [] (a decode step of a scanned layer): k, v and the index keys in `sel` are stacks
    [L, B, S, ...] read at that layer in place by the kernels (`sparse_decode_attention(layer=)`).
    key_slot: None, or static int [R] — the index keys in `sel` are stored once per KV group (K slots,
    `LayerLayout.key_slot`) and retrieval head r reads slot key_slot[r].
    Returns (out fp32 [B, C, N', H], blocks_frac fp32 [B] for a decode step with retrieval heads, else None)."""
    b, c = q.shape[:2]
    s, kh = k.shape[-3], k.shape[-2]
    dense = planner.dense_call(sparse, pos.total_len)
    sinks, window = planner.local_band(sparse, cfg, dense)
    new_len = pos.new_len
    kv_block = sparse.kv_block if sparse is not None else 64
    indexer = sparse is not None and sparse.selector == "indexer"
    if call.decode:
        q_sel, k_sel, bias = sel if sel is not None else (None, None, None)
        selection = selection_backend(call.decode_backend, indexer)
        plan = planner.decode_step_plan(np.asarray(is_r), None if q_sel is None else q_sel[:, 0], k_sel,
                                        None if bias is None else bias[:, 0], new_len, sinks, window, sparse,
                                        num_kv_heads=kh, num_keys=s, dense=dense, interpret=call.interpret,
                                        selection_backend=selection, active=active, layer=layer,
                                        key_slot=key_slot)
        out, _ = sparse_decode_attention(q[:, 0], k, v, plan, layer=layer, backend=call.decode_backend,
                                         interpret=call.interpret)
        return out[:, None].astype(jnp.float32), planner.visited_fraction(plan, rows or (), new_len, active)
    if layer is not None:
        raise ValueError("heads_attention: layer= (a stacked cache read in place) is for decode steps only")
    sel_r = None
    if sel is not None:
        sel_r = planner.retrieval_selection(*sel, pos.q_pos, pos.valid, new_len, sparse, tile=call.tile, dense=dense,
                                            backend=selection_backend(call.prefill_backend, indexer),
                                            interpret=call.interpret, key_slot=key_slot)
        if sel_heads is not None:  # back to all N' heads (a repeated head writes the same blocks twice)
            sel_r = jnp.zeros((b, q.shape[2]) + sel_r.shape[2:], bool).at[:, sel_heads].set(sel_r)
    plan = planner.chunk_plan(is_r, rows, sel_r, pos.q_pos[:, 0], c, s, new_len, sinks, window,
                              q_block=call.tile if sel_r is not None else 128, kv_block=kv_block, active=active)
    # named so that a rematerialised layer keeps its plan for the backward pass (`model.REMAT_POLICY`) instead of
    # running the selection again: a few MB per layer against a top-p over every tile
    plan = jax.tree.map(lambda x: checkpoint_name(x, PLAN_NAME), plan)
    if call.prefill_backend == "reference":
        out = prefill_reference.block_sparse_attention(q, k, v, plan, chunk=min(call.chunk, c))
    else:
        out = prefill_op.block_sparse_attention(q, k, v, plan, backend=call.prefill_backend, interpret=call.interpret)
    return out.astype(jnp.float32), None


def sequence_attention(qkv: dict, roles, ix: dict | None, sparse: SparseConfig | None, cfg: ModelConfig,
                       call: AttentionCall, lengths=None, r_heads=None, mesh=None):
    """RTPurbo attention of a whole sequence without a cache: out [B, T, N, H] (dtype of q).

    roles bool [N] (traced is fine: the scanned forward); sparse None: full attention (no retrieval head; the
    model's own sliding window, if any); ix: this layer's indexer for all N heads (w_q, w_k
    [N, H, I], optional prior) or None when retrieval heads run dense; lengths int [B] (right padding);
    r_heads: None, or int [R'] (traced is fine) — the heads whose selection runs: this layer's retrieval heads,
    padded by repeating one (`retrieval_rows`); None selects for all N heads and keeps the retrieval heads'.
    mesh: None, or a Mesh / AbstractMesh with axes "data" and "model": with several devices the call runs per
    shard under `shard_map` (`per_shard_specs`), because XLA does not partition a Pallas kernel (it gathers its
    inputs and runs the whole call on every device; Mosaic TPU refuses sharded inputs) while plans and attention
    are independent per sequence (and per head in full attention)."""
    if mesh is not None and mesh.size > 1:
        return _sequence_attention_per_shard(qkv, roles, ix, sparse, cfg, call, lengths, r_heads, mesh)
    b, t, n, _ = qkv["q"].shape
    pos = Positions.sequence(b, t, lengths)
    sel = None
    heads = jnp.arange(n) if r_heads is None else jnp.asarray(r_heads, jnp.int32)
    if not call.dense_retrieval:
        kv = heads // (n // qkv["k"].shape[2])
        ix_r = ix if ix is None or r_heads is None else jax.tree.map(lambda w: w[heads], ix)
        k_index = ixr.project_keys(ixr.group_keys(qkv["k_pre"], n, heads), ix_r["w_k"]) if sparse.selector == "indexer" else None
        # the selection is not differentiated (RTPurbo stage 2: gradients reach the weights through exact
        # attention over the selected blocks)
        sel = jax.lax.stop_gradient(selection_inputs(qkv, qkv["k"], ix_r, k_index, heads, kv, sparse))
    out, _ = heads_attention(qkv["q"], qkv["k"], qkv["v"], roles, None, sel, pos, sparse, cfg, call,
                             sel_heads=None if r_heads is None else heads)
    return out.astype(qkv["q"].dtype)


def per_shard_specs(mesh, batch: int, heads: tuple[int, ...] = ()) -> tuple:
    """(rows, lengths) PartitionSpecs of a per-shard attention call: rows [B, T, heads, H] with sequences over
    "data" and heads over "model", lengths [B] over "data" — each axis only where the mesh has it and its size
    divides every size given (the batch; `heads`: the query and KV head counts, empty when heads must stay
    whole, as in sparse mode, where a layer's retrieval heads are indexed across all N)."""
    split = lambda name, *sizes: (name if sizes and name in mesh.shape and all(x % mesh.shape[name] == 0 for x in sizes)
                                  else None)
    d, m = split("data", batch), split("model", *heads)
    return P(d, None, m, None), P(d)


def _sequence_attention_per_shard(qkv, roles, ix, sparse, cfg, call, lengths, r_heads, mesh):
    """`sequence_attention` under `shard_map` over `mesh`: sequences over "data"; heads over "model" in full
    attention only (sparse None); roles, the indexer and r_heads replicated."""
    b, t, n = qkv["q"].shape[:3]
    lengths = jnp.full((b,), t, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
    rows, lens = per_shard_specs(mesh, b, (n, qkv["k"].shape[2]) if sparse is None else ())
    qkv_specs = {name: rows for name in qkv}

    def core(qkv, lengths, roles, ix, r_heads):
        if sparse is None:  # full attention: no retrieval head among this shard's heads
            roles = np.zeros(qkv["q"].shape[2], bool)
        return sequence_attention(qkv, roles, ix, sparse, cfg, call, lengths, r_heads)

    return jax.shard_map(core, mesh=mesh, in_specs=(qkv_specs, lens, P(), P(), P()), out_specs=rows,
                         check_vma=False)(qkv, lengths, jnp.asarray(roles), ix, r_heads)


def full_sequence_attention(q, k, v, lengths, cfg: ModelConfig, call: AttentionCall, mesh=None):
    """Causal attention of whole sequences (no SparseConfig, no retrieval head: `sequence_attention`'s band plan)
    q [B, T, N, H], k, v [B, T, K, H], lengths int [B] or None -> [B, T, N, H] (q.dtype). mesh: per shard, as in
    `sequence_attention` (sequences over "data", query heads with their KV heads over "model")."""
    return sequence_attention({"q": q, "k": k, "v": v}, np.zeros(q.shape[2], bool), None, None, cfg, call, lengths,
                              mesh=mesh)


def retrieval_rows(roles: np.ndarray) -> np.ndarray:
    """int32 [L, R'] (R' = the most retrieval heads of any layer, at least 1): each layer's retrieval heads,
    padded by repeating its first (head 0 where a layer has none: a local head, whose selection is unused) —
    `sequence_attention`'s r_heads per layer, so the scanned forward selects for R' heads, not all N."""
    roles = np.asarray(roles, bool)
    width = max(1, int(roles.sum(-1).max()))
    out = np.zeros((roles.shape[0], width), np.int32)
    for li, row in enumerate(roles):
        ids = np.flatnonzero(row)
        if ids.size:
            out[li] = np.concatenate([ids, np.full(width - ids.size, ids[0])])
    return out


def scatter_rows(buf, new, slot, ok):
    """buf [B, X, ...] with new [B, C, ...] written at slot int [B, C] where ok; other rows dropped."""
    idx = jnp.where(ok, slot, buf.shape[1])  # out of bounds -> dropped
    return buf.at[jnp.arange(buf.shape[0])[:, None], idx].set(new.astype(buf.dtype), mode="drop")


def local_slots(layout: CacheLayout, pos: Positions):
    """Where the call's rows go in a local KV head's buffers: (in_sink bool [B, C] — the row is a sink position,
    stored at slot q_pos; ring slot int [B, C]; keep bool [B, C] — the row is among the last `ring` non-sink
    positions, stored at that ring slot)."""
    q_pos, valid = pos.q_pos, pos.valid
    in_sink = valid & (q_pos < layout.sinks)
    keep = valid & (q_pos >= layout.sinks) & (q_pos > (pos.new_len - 1)[:, None] - layout.ring)
    return in_sink, jnp.mod(q_pos - layout.sinks, max(layout.ring, 1)), keep


def _local_kv_updates(k_new, v_new, lc: LayerCache, layout: CacheLayout, pos: Positions):
    """The local KV heads' updated (k_sink, v_sink, k_ring, v_ring) after writing the call's valid rows
    (k_new, v_new [B, C, Kl, H]): positions below `sinks` into the sink slots, the last `ring` others into the
    ring."""
    in_sink, slot, keep = local_slots(layout, pos)
    return (scatter_rows(lc.k_sink, k_new, pos.q_pos, in_sink), scatter_rows(lc.v_sink, v_new, pos.q_pos, in_sink),
            scatter_rows(lc.k_ring, k_new, slot, keep), scatter_rows(lc.v_ring, v_new, slot, keep))


def _local_kv_attention(q, k_new, v_new, lc: LayerCache, layout: CacheLayout, pos: Positions, sinks, window):
    """Local KV heads: attention over sinks + ring + the call's new keys (jnp, a few thousand keys), and the
    updated (k_sink, v_sink, k_ring, v_ring). Decode steps and the reference backend use this attention; a
    prefill chunk on a kernel backend uses `_local_kv_attention_op`. q [B, C, Nl, H]; k_new, v_new [B, C, Kl, H].
    The three buffers are read in place (`masked_attention_parts`: one softmax, no concatenated copy of the
    ring, which cost 0.1 / 1.1 ms per 4 layers of an 8B model's decode step at B=1 / 8 on an H200); a
    low-precision cache meets the probabilities in its own dtype with fp32 accumulation."""
    b = q.shape[0]
    q_pos, valid, start = pos.q_pos, pos.valid, pos.start_len
    sink_pos = jnp.where(jnp.arange(layout.sinks)[None] < start[:, None], jnp.arange(layout.sinks)[None], -1)
    qp = q_pos[:, None, :, None]

    def mask(k_pos):  # k_pos int [B, S_i] -> bool [B, 1, C, S_i]
        kp = k_pos[:, None, None, :]
        return (kp >= 0) & (kp <= qp) & ((kp < sinks) | (qp - kp < window)) & valid[:, None, :, None]

    parts = [(lc.k_sink, lc.v_sink, mask(jnp.broadcast_to(sink_pos, (b, layout.sinks)))),
             (lc.k_ring, lc.v_ring, mask(ring_positions(layout, start - 1))),
             (k_new.astype(lc.k_ring.dtype), v_new.astype(lc.v_ring.dtype), mask(jnp.where(valid, q_pos, -1)))]
    out, _ = masked_attention_parts(q, [p for p in parts if p[0].shape[1]], p_in_v_dtype=True)
    return out, _local_kv_updates(k_new, v_new, lc, layout, pos)


def _local_kv_attention_op(q, k_new, v_new, lc: LayerCache, layout: CacheLayout, pos: Positions, sinks, window,
                           kv_block: int, call: AttentionCall):
    """`_local_kv_attention`'s output for a prefill chunk through the block-sparse prefill op (the device's
    kernel) instead of a masked jnp attention over sinks + ring + chunk (O(C · (ring + C)) fp32 scores).

    The ring is unrolled into a linear buffer whose index i holds position s0 + i (s0 = the start when it lies
    inside the sinks, else max(sinks, start - ring): every buffered position is written), the chunk's keys
    follow it, and a band plan (window, no sinks; causal in buffer indices = positions) runs on the op with its
    log-sum-exp. The sink slots' positions the band does not cover (below s0, or out of its window) are a tiny
    masked attention over the updated sink slots; the two parts merge by log-sum-exp. Same semantics and the
    same return value: (out fp32 [B, C, Nl, H], the updated (k_sink, v_sink, k_ring, v_ring))."""
    b, c, nl, _ = q.shape
    ring, n_sinks = max(layout.ring, 1), layout.sinks
    start, q_pos, valid = pos.start_len, pos.q_pos, pos.valid
    s0 = jnp.where(start < n_sinks, start, jnp.maximum(n_sinks, start - layout.ring))  # [B]
    slot = jnp.mod((s0 - n_sinks)[:, None] + jnp.arange(ring, dtype=jnp.int32)[None], ring)  # [B, ring]
    off = (start - s0)[:, None] + jnp.arange(c, dtype=jnp.int32)[None]  # chunk rows in buffer indices [B, C]

    def linear(ring_buf, new):
        unrolled = jnp.take_along_axis(ring_buf, slot[:, :, None, None], axis=1)
        buf = jnp.concatenate([unrolled, jnp.zeros((b, c) + new.shape[2:], ring_buf.dtype)], axis=1)
        return scatter_rows(buf, new, off, valid)

    k_buf, v_buf = linear(lc.k_ring, k_new), linear(lc.v_ring, v_new)
    new_len = pos.new_len
    plan = planner.chunk_plan(np.zeros(nl, bool), (), None, start - s0, c, ring + c, new_len - s0, jnp.int32(0),
                              window, q_block=128, kv_block=kv_block)
    out_b, lse_b = prefill_op.block_sparse_attention(q, k_buf, v_buf, plan, backend=call.prefill_backend,
                                                     interpret=call.interpret, return_lse=True)
    updates = _local_kv_updates(k_new, v_new, lc, layout, pos)
    if n_sinks == 0:  # no sink slots: the band is everything
        return out_b.astype(jnp.float32), updates
    k_sink, v_sink = updates[:2]
    sp = jnp.arange(n_sinks, dtype=jnp.int32)[None, None, None, :]
    qp = q_pos[:, None, :, None]
    in_band = (sp >= s0[:, None, None, None]) & (qp - sp < window)  # already counted by the band part
    mask = ((sp < new_len[:, None, None, None]) & (sp <= qp) & ((sp < sinks) | (qp - sp < window)) & ~in_band
            & valid[:, None, :, None])
    out_s, lse_s = masked_attention(q, k_sink, v_sink, mask)
    lse = jnp.logaddexp(lse_b, lse_s)  # [B, N, C]
    safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    w_b = jnp.where(jnp.isfinite(lse_b), jnp.exp(lse_b - safe), 0.0).transpose(0, 2, 1)[..., None]
    w_s = jnp.where(jnp.isfinite(lse_s), jnp.exp(lse_s - safe), 0.0).transpose(0, 2, 1)[..., None]
    return out_b.astype(jnp.float32) * w_b + out_s * w_s, updates


def new_rows(qkv: dict, ll: LayerLayout, ix: dict | None) -> dict:
    """The rows a call adds to one layer's cache, per buffer, in layout `ll` — the one definition both writers
    use (`cached_attention` into a layer's buffers, `layer_scan` into a stacked group): k_full, v_full
    [B, C, Kf, H] (the full KV heads), k_local, v_local [B, C, Kl, H] (the local ones; sinks or ring slots by
    `local_slots`), k_index fp32 [B, C, R, I] (the retrieval heads' index keys, before the cache's dtype; [B, C, K, I],
    one per KV group, when `ll.key_slot` is set) — each
    present when the layout has such heads. qkv: `model.project_qkv` of the new tokens in `ll`'s head order."""
    rows = {}
    for name, heads in (("full", ll.full_kv), ("local", ll.local_kv)):
        if heads:
            idx = jnp.asarray(heads)
            rows[f"k_{name}"], rows[f"v_{name}"] = qkv["k"][:, :, idx], qkv["v"][:, :, idx]
    if ll.retrieval_q:  # one index key per retrieval head, or per KV group when they share key maps
        w_k = ix["w_k"] if ll.key_slot is None else ix["w_k"][np.asarray(ll.index_rows)]
        rows["k_index"] = ixr.project_keys(qkv["k_pre"][:, :, jnp.asarray(ll.index_heads) // ll.group], w_k)
    return rows


def in_place_ok(sparse: SparseConfig | None, call: AttentionCall) -> bool:
    """Whether `cached_attention` can read a scanned layer's stacked full-KV buffers in place (`layer=`): decode
    steps without a mesh whose retrieval heads run dense or select with the indexer (the oracle selector gathers
    the layer's own keys)."""
    selects_in_place = call.dense_retrieval or sparse is None or sparse.selector == "indexer"
    return call.decode and call.mesh is None and selects_in_place


def cached_attention(qkv: dict, lc: LayerCache, ll: LayerLayout, layout: CacheLayout, cfg: ModelConfig,
                     sparse: SparseConfig | None, ix: dict | None, pos: Positions, call: AttentionCall, active=None,
                     rows: dict | None = None, layer=None):
    """One layer over the hybrid cache: (out fp32 [B, C, N, H], the updated LayerCache, blocks_frac fp32 [B] or
    None). blocks_frac: for a decode step, the mean over the layer's retrieval heads of the fraction of visible
    key blocks each visits (1.0 when they run dense); None without retrieval heads.

    qkv: `model.project_qkv` of the new tokens (q, q_pre [B, C, N, H]; k, v, k_pre [B, C, K, H]).
    ix: the layer's retrieval heads' indexer rows in ll.retrieval_q order (`indexer.rows`), or None.
    active: None, or bool [R] (traced): which of ll.retrieval_q are retrieval heads in this layer — a padded
    stacked layout's slots (`kv_cache.LayerLayout.padded`); the others are local heads that keep index keys.
    rows: `new_rows(qkv, ll, ix)` when the caller has them already (`layer_scan` writes them into its stack).
    With `call.mesh` the layer runs per shard of its "data" axis (`shard_map`; every sequence with all its heads).
    layer: None, or int32 [] (a decode step of a scanned layer, `layer_scan`; no mesh): lc's full-KV buffers
    (k_full, v_full, k_index) are its group's stacks [L, B, S, ...], already holding this step's rows, and the
    kernels read layer `layer` of them in place — they come back unchanged; the local buffers are the layer's own.
    """
    if layer is not None and not in_place_ok(sparse, call):
        raise ValueError("cached_attention: layer= is for decode steps without a mesh, with indexer selection")
    if call.mesh is not None:
        return _cached_attention_per_shard(qkv, lc, ll, layout, cfg, sparse, ix, pos, call, active, rows)
    outs, order, frac = [], [], None
    rows = new_rows(qkv, ll, ix) if rows is None else rows
    if ll.full_kv:
        k_full, v_full, k_index, sel = lc.k_full, lc.v_full, lc.k_index, None
        if layer is None:
            k_full = scatter_rows(k_full, rows["k_full"], pos.q_pos, pos.valid)
            v_full = scatter_rows(v_full, rows["v_full"], pos.q_pos, pos.valid)
        qf = ll.q_heads(ll.full_kv)
        r_rows = tuple(qf.index(r) for r in ll.retrieval_q)
        if ll.retrieval_q:
            rq = jnp.asarray(ll.retrieval_q)
            if layer is None:
                k_index = scatter_rows(k_index, ixr.store_keys(rows["k_index"], k_index.dtype), pos.q_pos, pos.valid)
            if not call.dense_retrieval:
                kv_r = jnp.asarray([ll.full_kv.index(r // ll.group) for r in ll.retrieval_q])
                sel = selection_inputs(qkv, k_full, ix, k_index, rq, kv_r, sparse)
        is_r = np.isin(np.asarray(qf), ll.retrieval_q)
        out, frac = heads_attention(qkv["q"][:, :, jnp.asarray(qf)], k_full, v_full, is_r, r_rows, sel, pos, sparse,
                                    cfg, call, active, layer=layer,
                                    key_slot=ll.key_slot if sparse is not None and sparse.selector == "indexer" else None)
        outs.append(out)
        order += list(qf)
        lc = dataclasses.replace(lc, k_full=k_full, v_full=v_full, k_index=k_index)
    if ll.local_kv:
        ql = ll.q_heads(ll.local_kv)
        sinks, window = planner.local_band(sparse, cfg, planner.dense_call(sparse, pos.total_len))
        q_l, k_l, v_l = qkv["q"][:, :, jnp.asarray(ql)], rows["k_local"], rows["v_local"]
        if call.decode or call.prefill_backend == "reference":
            out, (k_sink, v_sink, k_ring, v_ring) = _local_kv_attention(q_l, k_l, v_l, lc, layout, pos, sinks,
                                                                        window)
        else:  # a prefill chunk on the op (local KV heads exist only with a SparseConfig)
            out, (k_sink, v_sink, k_ring, v_ring) = _local_kv_attention_op(q_l, k_l, v_l, lc, layout, pos, sinks,
                                                                           window, sparse.kv_block, call)
        outs.append(out)
        order += list(ql)
        lc = dataclasses.replace(lc, k_sink=k_sink, v_sink=v_sink, k_ring=k_ring, v_ring=v_ring)
    inv = np.argsort(np.asarray(order))
    return jnp.concatenate(outs, axis=2)[:, :, inv], lc, frac


def _cached_attention_per_shard(qkv, lc, ll, layout, cfg, sparse, ix, pos, call, active, rows):
    """`cached_attention` under `shard_map` over `call.mesh`'s "data" axis: the call's rows, the layer's cache and
    positions split by sequence; the indexer rows and `active` replicated."""
    d = P("data")
    inner = dataclasses.replace(call, mesh=None)
    has_frac = []  # whether the layer reports blocks_frac (static: set while shard_map traces `core`)

    def core(qkv, lc, ix, pos, active, rows):
        out, lc, frac = cached_attention(qkv, lc, ll, layout, cfg, sparse, ix, pos, inner, active, rows)
        has_frac.append(frac is not None)
        return out, lc, jnp.zeros(out.shape[:1], jnp.float32) if frac is None else frac

    out, lc, frac = jax.shard_map(core, mesh=call.mesh, in_specs=(d, d, P(), d, P(), d), out_specs=(d, d, d),
                                  check_vma=False)(qkv, lc, ix, pos, active, rows)
    return out, lc, frac if has_frac[0] else None


__all__ = ["AttentionCall", "Positions", "cached_attention", "heads_attention", "in_place_ok", "local_slots",
           "new_rows", "scatter_rows", "retrieval_rows", "selection_inputs", "sequence_attention"]
