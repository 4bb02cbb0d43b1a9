"""Block-sparse attention in plain XLA ops, differentiable: the training backend (`backend="xla"`).

Flash-attention's algorithm written with jnp over a BlockPlan, with its own VJP. Query tiles are processed in
groups of `rows_per_group` rows; for each group a loop walks the plan's key-block lists `blocks_per_step`
entries at a time (gathered from k, v), with an online softmax. The loop of a group stops at the group's
largest count (a traced bound), so the early, short tiles of a causal plan cost little and the work follows
the plan's visited blocks, not T x S. 16-bit inputs meet on the tensor cores with fp32 accumulation, the
probabilities cast to v's dtype (as the flash kernels do); fp32 inputs stay fp32 at HIGHEST precision.

Backward (`jax.custom_vjp`, FlashAttention-2's): residuals are q, k, v, out, lse and the plan; the same walk
recomputes the probabilities from lse, accumulates dq per group and scatter-adds dk, dv per gathered block
(duplicate ids accumulate). Memory O(rows_per_group · blocks_per_step · kv_block) per head, never T x S; the
block ids are not differentiated (a plan is a selection, RTPurbo stage 2 trains through it).

Why not the Pallas kernels: they have no backward. Why not autodiff of `reference.block_sparse_attention`: it
keeps fp32 scores of every (query, key) pair for the backward and multiplies in fp32 (measured in
`benchmarks/results/stage2_step_profile_h200/`).

Axes: B batch, T queries, S keys, N query heads, K KV heads, G = N / K, H head_dim, Tb / Sb query / key blocks,
M plan entries per tile; in the loop g tiles of a group, q rows of a tile, u blocks per step, k keys of a block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.block_plan import BlockPlan, cdiv, zero_cotangent

_HI = jax.lax.Precision.HIGHEST


def _dot(spec, a, b):
    """einsum with fp32 accumulation: fp32 inputs at HIGHEST precision, 16-bit inputs on the tensor cores."""
    prec = _HI if a.dtype == jnp.float32 and b.dtype == jnp.float32 else None
    return jnp.einsum(spec, a, b, precision=prec, preferred_element_type=jnp.float32)


def _layout(q, k, v, plan: BlockPlan, gt: int, u: int):
    """Tiled views: q [B, N, Tb', qb, H] (Tb' = groups * gt query tiles, the last ones padding), k, v
    [B, K, Sb, kb, H] (the keys padded to whole blocks), ids [B, N, Tb', M'] (the plan's block ids, each row padded
    to M', a multiple of u; padded entries lie past `counts` and are never read), counts [B, N, Tb'] (0 on padded
    tiles)."""
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    qb, kb = plan.q_block, plan.kv_block
    tb = cdiv(cdiv(t, qb), gt) * gt
    sb = cdiv(s, kb)
    qt = jnp.pad(q, ((0, 0), (0, tb * qb - t), (0, 0), (0, 0))).reshape(b, tb, qb, n, h).transpose(0, 3, 1, 2, 4)
    tile_kv = lambda x: jnp.pad(x, ((0, 0), (0, sb * kb - s), (0, 0), (0, 0))).reshape(b, sb, kb, kh, h).transpose(
        0, 3, 1, 2, 4)
    m = plan.kv_blocks.shape[-1]
    mp = cdiv(m, u) * u
    pad_t = tb - plan.counts.shape[2]
    ids = jnp.pad(plan.kv_blocks, ((0, 0), (0, 0), (0, pad_t), (0, mp - m)))
    counts = jnp.pad(plan.counts, ((0, 0), (0, 0), (0, pad_t)))
    return qt, tile_kv(k), tile_kv(v), ids, counts


def _group_step(plan: BlockPlan, qg_pos, ids, counts, j, u, t_valid, kh_of_n):
    """For step j of a group: the gathered block ids [B, N, g, u], (b, kv-head) index arrays for the gather and
    the visibility mask bool [B, N, g, q, u * k] (plan entry valid, causal, band, kv_len, real query row)."""
    b, n, g, _ = ids.shape
    kb = plan.kv_block
    blk = jax.lax.dynamic_slice_in_dim(ids, j * u, u, axis=3)  # [B, N, g, u]
    entry_ok = (j * u + jnp.arange(u)) < counts[..., None]  # [B, N, g, u]
    k_pos = (blk[..., None] * kb + jnp.arange(kb)).reshape(b, n, g, u * kb)  # [B, N, g, uk]
    ok = jnp.repeat(entry_ok, kb, axis=-1)
    qp = qg_pos[:, None, :, :, None]  # [B, 1, g, q, 1]
    kp = k_pos[:, :, :, None, :]  # [B, N, g, 1, uk]
    sinks = plan.sinks[None, :, None, None, None]
    window = plan.window[None, :, None, None, None]
    mask = (ok[:, :, :, None, :] & (kp <= qp) & (kp < plan.kv_len[:, None, None, None, None])
            & ((kp < sinks) | (qp - kp < window)) & t_valid[:, None, :, :, None])
    bi = jnp.arange(b)[:, None, None, None]
    return blk, (bi, kh_of_n[None, :, None, None]), mask


def _gather(x, index, blk):
    """x [B, K, Sb, kb, H] at (b, kv head of n, blk) -> [B, N, g, u * kb, H]."""
    bi, ki = index
    out = x[bi, ki, blk]  # [B, N, g, u, kb, H]
    return out.reshape(out.shape[:3] + (-1, out.shape[-1]))


def _groups(plan: BlockPlan, t: int, tb: int, gt: int):
    """Per-group query positions int [ng, B, gt, qb] and validity bool [ng, B, gt, qb]."""
    b = plan.kv_blocks.shape[0]
    rows = jnp.arange(tb * plan.q_block, dtype=jnp.int32)
    pos = plan.query_starts()[:, None] + rows[None]  # [B, Tb' * qb]
    ng = tb // gt
    shape = (b, ng, gt, plan.q_block)
    valid = jnp.broadcast_to(rows < t, (b, rows.shape[0]))
    return pos.reshape(shape).transpose(1, 0, 2, 3), valid.reshape(shape).transpose(1, 0, 2, 3)


def _by_group(x, gt):
    """[B, N, Tb', ...] -> [ng, B, N, gt, ...]."""
    b, n, tb = x.shape[:3]
    return jnp.moveaxis(x.reshape((b, n, tb // gt, gt) + x.shape[3:]), 2, 0)


def _forward(q, k, v, plan: BlockPlan, scale, gt: int, u: int):
    """(out fp32 [B, N, Tb', qb, H], lse fp32 [B, N, Tb', qb]) in tiled layout."""
    t = q.shape[1]
    n, kh = q.shape[2], k.shape[2]
    qt, kt, vt, ids, counts = _layout(q, k, v, plan, gt, u)
    tb = qt.shape[2]
    pos, valid = _groups(plan, t, tb, gt)
    kh_of_n = jnp.arange(n) // (n // kh)

    def group(xs):
        qg, idg, cg, qpos, qval = xs  # [B, N, g, q, H], [B, N, g, M'], [B, N, g], [B, g, q] x2
        steps = cdiv_traced(jnp.max(cg), u)

        def body(j, carry):
            m_i, l_i, acc = carry
            blk, index, mask = _group_step(plan, qpos, idg, cg, j, u, qval, kh_of_n)
            s = _dot("bngqh,bngkh->bngqk", qg, _gather(kt, index, blk)) * scale
            s = jnp.where(mask, s, -jnp.inf)
            m_new = jnp.maximum(m_i, s.max(-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(jnp.where(jnp.isfinite(m_i), m_i, m_safe) - m_safe)
            vb = _gather(vt, index, blk)
            acc = acc * alpha[..., None] + _dot("bngqk,bngkh->bngqh", p.astype(vb.dtype), vb)
            return m_new, l_i * alpha + p.sum(-1), acc

        shape = qg.shape[:-1]
        init = (jnp.full(shape, -jnp.inf), jnp.zeros(shape), jnp.zeros(qg.shape, jnp.float32))
        m_i, l_i, acc = jax.lax.fori_loop(0, steps, body, init)
        seen = l_i > 0
        out = acc / jnp.where(seen, l_i, 1.0)[..., None]
        lse = jnp.where(seen, jnp.log(jnp.where(seen, l_i, 1.0)) + m_i, -jnp.inf)
        return out, lse

    out, lse = jax.lax.map(group, (_by_group(qt, gt), _by_group(ids, gt), _by_group(counts, gt), pos, valid))
    return _ungroup(out), _ungroup(lse)


def _ungroup(x):
    """[ng, B, N, gt, ...] -> [B, N, ng * gt, ...]."""
    x = jnp.moveaxis(x, 0, 2)
    return x.reshape(x.shape[:2] + (-1,) + x.shape[4:])


def cdiv_traced(a, b: int):
    return (a + b - 1) // b


def _backward(q, k, v, plan: BlockPlan, out_t, lse_t, d_out, d_lse, scale, gt: int, u: int):
    """(dq, dk, dv) fp32 in q, k, v's shapes from the tiled out / lse and their cotangents."""
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    qt, kt, vt, ids, counts = _layout(q, k, v, plan, gt, u)
    tb = qt.shape[2]
    qb = plan.q_block
    do_t = jnp.pad(d_out, ((0, 0), (0, tb * qb - t), (0, 0), (0, 0))).reshape(b, tb, qb, n, h).transpose(0, 3, 1, 2, 4)
    dl_t = jnp.pad(d_lse, ((0, 0), (0, 0), (0, tb * qb - t))).reshape(b, n, tb, qb)
    delta = (do_t.astype(jnp.float32) * out_t).sum(-1) - dl_t  # [B, N, Tb', qb]
    pos, valid = _groups(plan, t, tb, gt)
    kh_of_n = jnp.arange(n) // (n // kh)
    sb = kt.shape[2]

    def group(dkv, xs):
        qg, idg, cg, qpos, qval, dog, lg, dg = xs
        steps = cdiv_traced(jnp.max(cg), u)
        lg_safe = jnp.where(jnp.isfinite(lg), lg, 0.0)
        seen = jnp.isfinite(lg)

        def body(j, carry):
            dq, dk, dv = carry
            blk, index, mask = _group_step(plan, qpos, idg, cg, j, u, qval, kh_of_n)
            kb_, vb = _gather(kt, index, blk), _gather(vt, index, blk)
            s_ = _dot("bngqh,bngkh->bngqk", qg, kb_) * scale
            p = jnp.where(mask & seen[..., None], jnp.exp(s_ - lg_safe[..., None]), 0.0)
            dp = _dot("bngqh,bngkh->bngqk", dog, vb)
            ds = p * (dp - dg[..., None]) * scale
            dq = dq + _dot("bngqk,bngkh->bngqh", ds.astype(kb_.dtype), kb_)
            dk_b = _dot("bngqk,bngqh->bngkh", ds.astype(qg.dtype), qg)
            dv_b = _dot("bngqk,bngqh->bngkh", p.astype(dog.dtype), dog)
            bi, ki = index
            kbk = plan.kv_block
            split = lambda x: x.reshape(x.shape[:3] + (u, kbk, h))
            dk = dk.at[bi, ki, blk].add(split(dk_b))
            dv = dv.at[bi, ki, blk].add(split(dv_b))
            return dq, dk, dv

        dq0 = jnp.zeros(qg.shape, jnp.float32)
        dq, dk, dv = jax.lax.fori_loop(0, steps, body, (dq0,) + dkv)
        return (dk, dv), dq

    zeros = jnp.zeros((b, kh, sb, plan.kv_block, h), jnp.float32)
    xs = (_by_group(qt, gt), _by_group(ids, gt), _by_group(counts, gt), pos, valid, _by_group(do_t.astype(q.dtype), gt),
          _by_group(lse_t, gt), _by_group(delta, gt))
    (dk, dv), dq = jax.lax.scan(group, (zeros, zeros), xs)
    dq = _ungroup(dq).transpose(0, 2, 3, 1, 4).reshape(b, tb * qb, n, h)[:, :t]
    untile = lambda x: x.transpose(0, 2, 3, 1, 4).reshape(b, sb * plan.kv_block, kh, h)[:, :s]
    return dq, untile(dk), untile(dv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attention(q, k, v, plan, scale, gt, u):
    out_t, lse_t = _forward(q, k, v, plan, scale, gt, u)
    return _untile_out(out_t, lse_t, q)


def _untile_out(out_t, lse_t, q):
    b, t, n, h = q.shape
    out = out_t.transpose(0, 2, 3, 1, 4).reshape(b, -1, n, h)[:, :t].astype(q.dtype)
    return out, lse_t.reshape(b, n, -1)[..., :t]


def _attention_fwd(q, k, v, plan, scale, gt, u):
    out_t, lse_t = _forward(q, k, v, plan, scale, gt, u)
    return _untile_out(out_t, lse_t, q), (q, k, v, plan, out_t, lse_t)


def _attention_bwd(scale, gt, u, res, cts):
    q, k, v, plan, out_t, lse_t = res
    d_out, d_lse = cts
    dq, dk, dv = _backward(q, k, v, plan, out_t, lse_t, d_out, d_lse, scale, gt, u)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), zero_cotangent(plan)


_attention.defvjp(_attention_fwd, _attention_bwd)


def block_sparse_attention_xla(q, k, v, plan: BlockPlan, *, scale=None, rows_per_group: int = 4096,
                               blocks_per_step: int = 16):
    """Exact attention restricted to `plan`, differentiable in q, k, v (the reference's contract and semantics).

    q [B, T, N, H]; k, v [B, S, K, H] (any float dtype) -> (out [B, T, N, H] in q.dtype, lse fp32 [B, N, T]).
    rows_per_group: query rows walked together (rounded to whole tiles; memory and the causal saving trade
    here); blocks_per_step: plan entries gathered per step (fewer, longer steps). The defaults were the fastest
    forward + backward of a sweep on an H200 (`benchmarks/results/stage2_step_h200_tuning/`: Qwen2.5-0.5B's
    heads, a 15%-retrieval plan, 8K and 32K tokens; 1024-8192 rows x 2-16 blocks)."""
    h = q.shape[-1]
    scale = float(h ** -0.5 if scale is None else scale)
    gt = max(1, min(rows_per_group // plan.q_block, cdiv(q.shape[1], plan.q_block)))
    u = max(1, min(blocks_per_step, plan.kv_blocks.shape[-1]))
    return _attention(q, k, v, plan, scale, gt, u)
