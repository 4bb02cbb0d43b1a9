"""Pure-jnp block-sparse attention over a BlockPlan: the definition every kernel is checked against.

Exact attention (full head_dim, the caller's RoPE'd q/k, full v) with the softmax taken over the visible
tokens only (`pallas_kernels.block_plan` defines visibility). Queries are processed in chunks of `chunk`
rows, so memory is O(B · N · chunk · S) floats, never T × S. A query row that sees no key returns zeros and
log-sum-exp -inf.

Axes: B batch, T query length, S key length, N query heads, K KV heads, G = N / K, H head_dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.block_plan import FULL_WINDOW, BlockPlan, band_plan, cdiv, selection_from_plan, token_mask

_HI = jax.lax.Precision.HIGHEST


def _check_shapes(q, k, v):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, T|S, heads, head_dim]; got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {k.shape} vs {v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch or head_dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} not a multiple of KV heads {k.shape[2]}")


def masked_scores(q_chunk, k, scale):
    """fp32 [B, N, C, S] scores of q_chunk [B, C, N, H] against k [B, S, K, H] (GQA by grouping)."""
    b, c, n, h = q_chunk.shape
    kh = k.shape[2]
    qg = q_chunk.reshape(b, c, kh, n // kh, h)
    s = jnp.einsum("bckgh,bskh->bkgcs", qg, k, precision=_HI, preferred_element_type=jnp.float32)
    return (s * scale).reshape(b, n, c, k.shape[1])


def softmax_av(scores, mask, v):
    """Softmax over visible keys and the weighted sum of v: out [B, C, N, H] fp32, lse [B, N, C]."""
    p, lse = _softmax(scores, jnp.broadcast_to(mask, scores.shape))
    return _weighted_v(p, v), lse


def masked_attention(q, k, v, mask, scale=None):
    """Attention of q [B, C, N, H] over k, v [B, S, K, H] under an explicit mask bool [B|1, N|1, C, S].

    Returns out fp32 [B, C, N, H] and lse fp32 [B, N, C]; fully masked rows give zeros / -inf. O(B·N·C·S).
    """
    return masked_attention_parts(q, [(k, v, mask)], scale)


def masked_attention_parts(q, parts, scale=None, p_in_v_dtype: bool = False):
    """`masked_attention` over keys held in several buffers, one softmax, without concatenating them:
    parts = [(k_i, v_i [B, S_i, K, H], mask_i bool [B|1, N|1, C, S_i])]. Only the fp32 scores are joined
    ([B, N, C, sum S_i], small for a decode token), so a cache buffer is read in place, never copied.
    p_in_v_dtype: probabilities meet a low-precision v in v's dtype with fp32 accumulation (as flash kernels
    do) instead of v converted to fp32 (exact; the default). Returns out fp32 [B, C, N, H], lse fp32 [B, N, C]."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = [masked_scores(q, k, scale) for k, _, _ in parts]
    masks = [jnp.broadcast_to(m, sc.shape) for (_, _, m), sc in zip(parts, scores)]
    p, lse = _softmax(jnp.concatenate(scores, -1), jnp.concatenate(masks, -1))
    out, off = 0.0, 0
    for _, v, _ in parts:
        s_i = v.shape[1]
        out = out + _weighted_v(p[..., off:off + s_i], v, p_in_v_dtype)
        off += s_i
    return out, lse


def _softmax(scores, mask):
    """(probabilities fp32 [B, N, C, S] over visible keys, lse fp32 [B, N, C]); fully masked rows give 0 / -inf."""
    scores = jnp.where(mask, scores, -jnp.inf)
    mx = jnp.max(scores, axis=-1, keepdims=True)
    mx_safe = jnp.where(jnp.isfinite(mx), mx, 0.0)
    p = jnp.exp(scores - mx_safe)
    denom = p.sum(-1, keepdims=True)
    lse = jnp.where(denom[..., 0] > 0, jnp.log(denom[..., 0]) + mx_safe[..., 0], -jnp.inf)
    return p / jnp.where(denom > 0, denom, 1.0), lse


def _weighted_v(p, v, p_in_v_dtype: bool = False):
    """fp32 [B, C, N, H]: probabilities p fp32 [B, N, C, S] times v [B, S, K, H] (GQA by grouping), exactly
    (v in fp32) or with p cast to v's dtype and fp32 accumulation."""
    b, n, c, s = p.shape
    kh = v.shape[2]
    pg = p.reshape(b, kh, n // kh, c, s)
    if v.dtype == jnp.float32 or not p_in_v_dtype:
        out = jnp.einsum("bkgcs,bskh->bckgh", pg, v.astype(jnp.float32), precision=_HI)
    else:
        out = jnp.einsum("bkgcs,bskh->bckgh", pg.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, c, n, v.shape[-1])


@functools.partial(jax.jit, static_argnames=("chunk", "return_lse"))
def block_sparse_attention(q, k, v, plan: BlockPlan, *, scale=None, chunk: int = 512, return_lse: bool = False):
    """Exact attention restricted to a BlockPlan.

    Args:
      q: [B, T, N, H] (any float dtype); k, v: [B, S, K, H].
      plan: BlockPlan over T queries and S keys.
      scale: score scale, default 1/sqrt(H).
      chunk: query rows per step (memory O(B·N·chunk·S)).
    Returns:
      out [B, T, N, H] in q.dtype (fp32 accumulation); with return_lse also lse fp32 [B, N, T].
    """
    _check_shapes(q, k, v)
    b, t, n, h = q.shape
    s = k.shape[1]
    scale = h ** -0.5 if scale is None else scale
    chunk = min(chunk, t)
    nc = cdiv(t, chunk)
    qp = jnp.pad(q, ((0, 0), (0, nc * chunk - t), (0, 0), (0, 0)))
    sel = selection_from_plan(plan, cdiv(s, plan.kv_block))  # [B, N, Tb, Sb]
    cols = jnp.arange(s) // plan.kv_block
    tb = sel.shape[2]

    def one(ci):
        rows = ci * chunk + jnp.arange(chunk)
        qc = jax.lax.dynamic_slice_in_dim(qp, ci * chunk, chunk, axis=1)
        block_sel = jnp.take(sel, jnp.minimum(rows // plan.q_block, tb - 1), axis=2)[..., cols]
        mask = token_mask(plan, plan.query_starts()[:, None] + rows[None], jnp.arange(s), block_sel)
        mask = mask & (rows < t)[None, None, :, None]
        return softmax_av(masked_scores(qc, k, scale), mask, v)

    out, lse = jax.lax.map(one, jnp.arange(nc))  # [nc, B, C, N, H], [nc, B, N, C]
    out = jnp.moveaxis(out, 0, 1).reshape(b, nc * chunk, n, h)[:, :t].astype(q.dtype)
    if not return_lse:
        return out
    lse = jnp.moveaxis(lse, 0, 2).reshape(b, n, nc * chunk)[..., :t]
    return out, lse


def attention(q, k, v, *, sinks=0, window=FULL_WINDOW, q_offset: int | None = None, lengths=None,
              scale=None, chunk: int = 512, return_lse: bool = False):
    """Causal GQA attention with an optional sink + window band (local heads) and right padding.

    Shapes as `block_sparse_attention`. `sinks`/`window` are ints or int [N]; `window=FULL_WINDOW` gives full
    causal attention. `q_offset` defaults to S - T (queries are the last T positions). `lengths` int [B]:
    valid keys per sequence. Memory O(B·N·chunk·S).
    """
    _check_shapes(q, k, v)
    b, t, n, _ = q.shape
    s = k.shape[1]
    q_offset = s - t if q_offset is None else q_offset
    blk = 64
    plan = band_plan(b, n, t, s, sinks=sinks, window=window, q_block=blk, kv_block=blk, q_offset=q_offset,
                     lengths=lengths)
    return block_sparse_attention(q, k, v, plan, scale=scale, chunk=chunk, return_lse=return_lse)
