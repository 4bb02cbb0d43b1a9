"""One layer's attention over the hybrid KV cache, for C new tokens per sequence at traced positions.

The same function serves a prefill chunk (C = chunk) and a decode step (C = 1). Per sequence b the new tokens
sit at positions `q_pos[b, c]`; rows with `valid[b, c] = False` (right padding) write nothing.

Serving semantics (what `rtpurbo_jax.serving` computes; `lm.apply` matches it under the conditions in the
tests):
- **local heads** always see `sinks` + the last `window` positions — the hybrid cache keeps nothing else, so
  unlike `lm.apply` they do not turn dense below `seqlen_threshold`;
- **retrieval heads** run dense while the sequence (prompt length in prefill, current length in decode) is
  shorter than `seqlen_threshold`; past it, prefill follows `prefill_mode` (dense, or indexer top-p per tile of
  `q_block` rows, tiles counted from the chunk start) and decode keeps each token's own top-p block set
  (sinks and the last `keep_recent` tokens forced, as in `pallas_kernels.indexer_topp`);
- a dense cache (`sparse=None`) is plain causal attention (with the model's own sliding window, if any).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from pallas_kernels.block_plan import FULL_WINDOW, plan_from_selection
from pallas_kernels.indexer_topp.api import decode_plan_select
from pallas_kernels.indexer_topp.reference import topp_selection_at
from pallas_kernels.sparse_attention.api import block_sparse_attention
from pallas_kernels.sparse_attention.api import default_backend as default_prefill_backend
from pallas_kernels.sparse_attention.reference import masked_attention
from pallas_kernels.sparse_decode.api import sparse_decode_attention
from pallas_kernels.sparse_decode.plan import decode_plan
from rtpurbo_jax.kv_cache import CacheLayout, LayerCache, LayerLayout, ring_positions
from rtpurbo_jax.model_config import ModelConfig
from rtpurbo_jax.sparse_config import SparseConfig

_HI = jax.lax.Precision.HIGHEST
log = logging.getLogger(__name__)


def scatter_rows(buf, new, slot, ok):
    """buf [B, X, ...] with new [B, C, ...] written at slot int [B, C] where ok; other rows dropped."""
    idx = jnp.where(ok, slot, buf.shape[1])  # out of bounds -> dropped
    return buf.at[jnp.arange(buf.shape[0])[:, None], idx].set(new.astype(buf.dtype), mode="drop")


def _local_band(sparse: SparseConfig | None, cfg: ModelConfig) -> tuple[int, int]:
    if sparse is None:
        return 0, cfg.sliding_window or FULL_WINDOW
    return sparse.sinks, sparse.window


def _retrieval_blocks(q_idx, k_index, q_pos, valid, new_len, total_len, sparse: SparseConfig, *, tile: int,
                      local_bias=None):
    """bool [B, Nr, C / tile, Sb]: the key blocks each retrieval head's query tiles visit (jnp path)."""
    kw = dict(top_p=sparse.top_p, kv_block=sparse.kv_block, sinks=sparse.sinks, keep_recent=sparse.keep_recent,
              max_blocks=sparse.max_blocks, local_bias=local_bias)
    sel = topp_selection_at(q_idx, k_index.astype(jnp.float32), jnp.where(valid, q_pos, -1), new_len, tile=tile,
                            **kw)
    if sparse.seqlen_threshold > 0:
        sel = sel | (total_len < sparse.seqlen_threshold)[:, None, None, None]
    return sel


def _selection_inputs(qkv, k_full, ix, lc_index, ll: LayerLayout, sparse: SparseConfig):
    """(queries fp32 [B, C, Nr, X], keys [B, S, Nr, X], local prior fp32 [B, C, Nr] or None) that score the
    retrieval heads' blocks: the indexer's index queries, cached index keys (X = index_dim) and, when the indexer
    has one, its local prior (`pallas_kernels.indexer_topp.reference`); or with `selector="oracle"` the head's
    own post-RoPE q / sqrt(H) and its KV head's full keys (X = H) — top-p over the exact attention's blocks."""
    rq = jnp.asarray(ll.retrieval_q)
    if sparse.selector == "oracle":
        h = qkv["q"].shape[-1]
        kv_slot = jnp.asarray([ll.full_kv.index(r // ll.group) for r in ll.retrieval_q])
        return qkv["q"][:, :, rq].astype(jnp.float32) * h ** -0.5, k_full[:, :, kv_slot], None
    q_pre = qkv["q_pre"][:, :, rq]
    q_idx = jnp.einsum("bcrh,rhi->bcri", q_pre, ix["w_q"], precision=_HI, preferred_element_type=jnp.float32)
    bias = None
    if "w_local" in ix:
        bias = jnp.einsum("bcrh,rh->bcr", q_pre, ix["w_local"], precision=_HI,
                          preferred_element_type=jnp.float32) + ix["b_local"]
    return q_idx, lc_index, bias


def _decode_kernel_attention(q, k_full, v_full, ll: LayerLayout, qf, q_idx, k_index, new_len, total_len, sinks,
                             window, sparse: SparseConfig | None, backend, interpret, local_bias=None):
    """Decode (C = 1) over the full KV heads with the sparse decode kernel: out fp32 [B, 1, Nf, H].

    q_idx fp32 [B, 1, Nr, I] retrieval heads' index queries, or None (retrieval heads dense); local heads get
    their sink + window blocks. The plan comes from `decode_plan_select`: with the triton backend the fused
    scoring kernel and the sort-free top-p + packing kernel, else the XLA selection.
    """
    b, s = k_full.shape[:2]
    kv_block = sparse.kv_block if sparse is not None else 64
    n = len(qf)
    retrieval = tuple(qf.index(r) for r in ll.retrieval_q)
    if q_idx is not None:
        dense = (total_len < sparse.seqlen_threshold) if sparse.seqlen_threshold > 0 else None
        plan = decode_plan_select(q_idx[:, 0], k_index, new_len, retrieval=retrieval, num_kv_heads=len(ll.full_kv),
                                  head_sinks=[sinks] * n, head_window=[window] * n, top_p=sparse.top_p,
                                  kv_block=kv_block, sinks=sparse.sinks, keep_recent=sparse.keep_recent, dense=dense,
                                  max_blocks=sparse.max_blocks, interpret=interpret,
                                  local_bias=None if local_bias is None else local_bias[:, 0],
                                  backend="triton" if backend == "triton" and sparse.selector == "indexer"
                                  else "reference")
    else:  # every retrieval head dense: the plan is static bands + whole causal ranges
        sb = -(-s // kv_block)
        q_pos = (new_len - 1)[:, None]
        k_lo = jnp.arange(sb) * kv_block
        causal = k_lo <= q_pos
        band = causal & ((k_lo < sinks) | (k_lo + kv_block - 1 > q_pos - window))  # [B, Sb]
        is_r = jnp.asarray([i in retrieval for i in range(n)])
        blocks = jnp.where(is_r[None, :, None], causal[:, None], band[:, None])
        plan = decode_plan(blocks, len(ll.full_kv), sinks=jnp.where(is_r, 0, sinks),
                           window=jnp.where(is_r, FULL_WINDOW, window), kv_len=new_len, kv_block=kv_block)
    out, _ = sparse_decode_attention(q[:, 0], k_full, v_full, plan, backend=backend, interpret=interpret)
    used = plan.head_mask & (jnp.arange(plan.head_mask.shape[2])[None, None, :, None] < plan.counts[..., None, None])
    per_head = used.sum(2).reshape(b, n)  # [B, N] blocks each head visits
    rows = jnp.asarray(retrieval, jnp.int32) if retrieval else None
    frac = None if rows is None else (per_head[:, rows] / -(-new_len[:, None] // kv_block)).mean(-1)
    return out[:, None].astype(jnp.float32), frac


def prefill_backend(backend: str, interpret: bool, q, k, plan) -> str:
    """The block-sparse prefill backend that goes with a decode backend: mosaic_tpu with mosaic_tpu; with triton
    the best GPU kernel for the plan (Mosaic GPU on Hopper when it supports the plan), triton in interpret mode."""
    if backend == "triton" and not interpret:
        return default_prefill_backend("gpu", q, k, plan)
    return backend


def _prefill_kernel_attention(q, k_full, v_full, ll: LayerLayout, qf, sel, q_pos, new_len, sinks, window,
                              sparse: SparseConfig | None, tile: int, backend: str, interpret: bool):
    """A prefill chunk (C rows from q_pos[:, 0], contiguous) over the full KV heads with the block-sparse
    prefill kernel: out fp32 [B, C, Nf, H]. sel: bool [B, Nr, C / tile, Sb] retrieval blocks per `tile` rows,
    or None (retrieval heads dense); local heads get their sink + window blocks per query tile."""
    b, c = q.shape[:2]
    s = k_full.shape[1]
    kv_block = sparse.kv_block if sparse is not None else 64
    q_block = tile if sel is not None else 128
    tb, sb = -(-c // q_block), -(-s // kv_block)
    q_lo = q_pos[:, :1] + jnp.arange(tb)[None] * q_block  # [B, Tb]
    k_lo = jnp.arange(sb) * kv_block
    causal = k_lo <= (q_lo + q_block - 1)[..., None]  # [B, Tb, Sb]
    band = causal & ((k_lo < sinks) | (k_lo + kv_block - 1 > q_lo[..., None] - window))
    blocks = jnp.broadcast_to(band[:, None], (b, len(qf), tb, sb))
    is_r = jnp.asarray([n in ll.retrieval_q for n in qf])
    if ll.retrieval_q:
        where = jnp.asarray([qf.index(r) for r in ll.retrieval_q])
        rsel = causal[:, None] if sel is None else sel & causal[:, None]
        blocks = blocks.at[:, where].set(jnp.broadcast_to(rsel, (b, len(where), tb, sb)))
    plan = plan_from_selection(blocks, sinks=jnp.where(is_r, 0, sinks), window=jnp.where(is_r, FULL_WINDOW, window),
                               kv_len=new_len, q_block=q_block, kv_block=kv_block, q_start=q_pos[:, 0])
    kernel = prefill_backend(backend, interpret, q, k_full, plan)
    log.info("prefill chunk: block-sparse attention backend=%s (q %s, q_block %d, kv_block %d)", kernel, q.dtype,
             q_block, kv_block)
    out = block_sparse_attention(q, k_full, v_full, plan, interpret=interpret, backend=kernel)
    return out.astype(jnp.float32)


def layer_attention(qkv: dict, lc: LayerCache, ll: LayerLayout, layout: CacheLayout, cfg: ModelConfig,
                    sparse: SparseConfig | None, ix: dict | None, *, q_pos, valid, start_len, total_len, tile: int,
                    dense_retrieval: bool, backend: str = "reference", interpret: bool = False):
    """(attention output fp32 [B, C, N, H], the updated LayerCache, blocks_frac fp32 [B] or None).

    blocks_frac: for a decode step (C = 1), the mean over this layer's retrieval heads of the fraction of
    visible key blocks each visits (1.0 when they run dense); None when the layer has no retrieval head.

    qkv: project_qkv's dict for the new tokens (q, q_pre [B, C, N, H]; k, v, k_pre [B, C, K, H]).
    ix: this layer's retrieval heads' indexer (ll.retrieval_q order): w_q, w_k [Nr, H, I], optionally the local
    prior w_local [Nr, H], b_local [Nr]; None when the layer has no retrieval head.
    q_pos int [B, C]; valid bool [B, C]; start_len int [B] positions cached before this call; total_len int [B]
    the sequence length that decides `seqlen_threshold`. tile: rows per top-p plan; dense_retrieval: static,
    retrieval heads skip the indexer. backend: attention over the full KV heads — "reference" (masked jnp) or a
    `pallas_kernels.sparse_decode` backend name: a decode step (C = 1) runs that sparse decode kernel, a prefill
    chunk the block-sparse prefill kernel that goes with it (`prefill_backend`). Local KV heads use jnp.
    """
    b, c, n, h = qkv["q"].shape
    new_len = start_len + valid.sum(-1).astype(jnp.int32)
    sinks, window = _local_band(sparse, cfg)
    outs, order = [], []
    frac = jnp.ones((b,), jnp.float32) if ll.retrieval_q else None  # dense retrieval heads visit every block

    if ll.full_kv:
        kf = jnp.asarray(ll.full_kv)
        k_full = scatter_rows(lc.k_full, qkv["k"][:, :, kf], q_pos, valid)
        v_full = scatter_rows(lc.v_full, qkv["v"][:, :, kf], q_pos, valid)
        qf = ll.q_heads(ll.full_kv)
        s = k_full.shape[1]
        kp = jnp.arange(s)[None, None, None, :]
        qp = q_pos[:, None, :, None]
        base = (kp <= qp) & (kp < new_len[:, None, None, None]) & valid[:, None, :, None]
        band = (kp < sinks) | (qp - kp < window)  # [B, 1, C, S]
        mask = jnp.broadcast_to(band, (b, len(qf), c, s))
        k_index, sel = lc.k_index, None
        q_idx = bias = None
        if ll.retrieval_q:
            rq = jnp.asarray(ll.retrieval_q)
            k_new = jnp.einsum("bcrh,rhi->bcri", qkv["k_pre"][:, :, rq // ll.group], ix["w_k"], precision=_HI,
                               preferred_element_type=jnp.float32)
            k_index = scatter_rows(lc.k_index, k_new, q_pos, valid)
            if not dense_retrieval:
                q_idx, k_sel, bias = _selection_inputs(qkv, k_full, ix, k_index, ll, sparse)
        qf_q = qkv["q"][:, :, jnp.asarray(qf)]
        if backend != "reference" and c == 1:
            out, frac = _decode_kernel_attention(qf_q, k_full, v_full, ll, qf, q_idx,
                                                 None if q_idx is None else k_sel, new_len, total_len, sinks, window,
                                                 sparse, backend, interpret, bias)
        elif backend != "reference":
            if q_idx is not None:
                sel = _retrieval_blocks(q_idx, k_sel, q_pos, valid, new_len, total_len, sparse, tile=tile,
                                        local_bias=bias)
            out = _prefill_kernel_attention(qf_q, k_full, v_full, ll, qf, sel, q_pos, new_len, sinks, window,
                                            sparse, tile, backend, interpret)
        else:
            if q_idx is not None:
                sel = _retrieval_blocks(q_idx, k_sel, q_pos, valid, new_len, total_len, sparse, tile=tile,
                                        local_bias=bias)
                if c == 1:
                    frac = (sel.sum(-1)[:, :, 0] / -(-new_len[:, None] // sparse.kv_block)).mean(-1)
            if ll.retrieval_q:  # retrieval heads: their blocks (or everything), no band
                where = jnp.asarray([qf.index(r) for r in ll.retrieval_q])
                blocks = True if sel is None else jnp.repeat(sel, tile, axis=2)[..., jnp.arange(s) // sparse.kv_block]
                mask = mask.at[:, where].set(jnp.broadcast_to(blocks, (b, len(ll.retrieval_q), c, s)))
            out, _ = masked_attention(qf_q, k_full, v_full, mask & base)
        outs.append(out)
        order += list(qf)
        lc = LayerCache(k_full, v_full, lc.k_sink, lc.v_sink, lc.k_ring, lc.v_ring, k_index)

    if ll.local_kv:
        kl = jnp.asarray(ll.local_kv)
        k_new, v_new = qkv["k"][:, :, kl], qkv["v"][:, :, kl]
        sink_pos = jnp.where(jnp.arange(layout.sinks)[None] < start_len[:, None], jnp.arange(layout.sinks)[None], -1)
        ring_pos = ring_positions(layout, start_len - 1)
        new_pos = jnp.where(valid, q_pos, -1)
        k_pos = jnp.concatenate([jnp.broadcast_to(sink_pos, (b, layout.sinks)), ring_pos, new_pos], axis=1)
        keys = jnp.concatenate([lc.k_sink, lc.k_ring, k_new.astype(lc.k_ring.dtype)], axis=1)
        vals = jnp.concatenate([lc.v_sink, lc.v_ring, v_new.astype(lc.v_ring.dtype)], axis=1)
        kp, qp = k_pos[:, None, None, :], q_pos[:, None, :, None]
        mask = (kp >= 0) & (kp <= qp) & ((kp < sinks) | (qp - kp < window)) & valid[:, None, :, None]
        ql = ll.q_heads(ll.local_kv)
        out, _ = masked_attention(qkv["q"][:, :, jnp.asarray(ql)], keys, vals, mask)
        outs.append(out)
        order += list(ql)
        k_sink = scatter_rows(lc.k_sink, k_new, q_pos, valid & (q_pos < layout.sinks))
        v_sink = scatter_rows(lc.v_sink, v_new, q_pos, valid & (q_pos < layout.sinks))
        keep = valid & (q_pos >= layout.sinks) & (q_pos > (new_len - 1)[:, None] - layout.ring)
        slot = jnp.mod(q_pos - layout.sinks, max(layout.ring, 1))
        lc = LayerCache(lc.k_full, lc.v_full, k_sink, v_sink, scatter_rows(lc.k_ring, k_new, slot, keep),
                        scatter_rows(lc.v_ring, v_new, slot, keep), lc.k_index)

    inv = jnp.argsort(jnp.asarray(order))
    return jnp.concatenate(outs, axis=2)[:, :, inv], lc, frac
