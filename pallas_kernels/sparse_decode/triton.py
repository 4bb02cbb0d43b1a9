"""Sparse decode attention, Pallas with the Triton lowering (portable GPU backend), split-K.

Grid (B, K, splits): one program per (sequence, GQA group, split). The program takes its share of the group's
union entries (`counts` split evenly at run time, so short plans do not idle most programs), loads each K/V
block once for all G query heads of the group (q rows padded to at least 16 for the tensor cores), masks per
head with `head_mask`, and keeps the online-softmax state in fp32. It writes a normalised partial output and
its log-sum-exp; `combine` merges the splits (one small XLA fusion). Two launches from plan to output.

Layouts: q [B, K, Gp, H] (padded group rows), k / v [B, S, K, H] in place; S a multiple of kv_block. With
`layer` (a stacked cache: k / v [L, B, S, K, H], int32 [] traced) each program reads layer `layer` of the stack
in place — a scanned layer needs no copy of its slice (an operand of a kernel is otherwise materialised).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import online_softmax
from pallas_kernels.sparse_decode.plan import DecodePlan, head_mask_words, kernel_dims



def _kernel(*refs, scale, kv_block, m_max, gp, num_kv, splits, bits, stacked):
    if stacked:  # whole-stack refs [L, B, S, K, H]: this program's rows of layer `layer` in place
        blocks_ref, counts_ref, hmask_ref, sinks_ref, window_ref, shift_ref, kvlen_ref, layer_ref, q_ref, k_ref, \
            v_ref, o_ref, lse_ref = refs
    else:  # k / v blocks [S, H] of this program's sequence and KV head
        blocks_ref, counts_ref, hmask_ref, sinks_ref, window_ref, shift_ref, kvlen_ref, q_ref, k_ref, v_ref, o_ref, \
            lse_ref = refs
    b, kh, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    if stacked:
        layer = layer_ref[0]
        rows = lambda ref, start: ref[layer, b, pl.ds(start, kv_block), kh, :]
    else:
        rows = lambda ref, start: ref[pl.ds(start, kv_block), :]
    row = b * num_kv + kh
    count = counts_ref[row]
    per = (count + splits - 1) // splits
    lo = sp * per
    hi = jnp.minimum(lo + per, count)
    kv_len = kvlen_ref[b]
    q_pos = kv_len - 1 - shift_ref[pl.ds(kh * gp, gp)][:, None]  # [Gp, 1]: each row's own position
    q = q_ref[...]  # [Gp, H]
    sink = sinks_ref[pl.ds(kh * gp, gp)][:, None]
    window = window_ref[pl.ds(kh * gp, gp)][:, None]
    qk_scale = scale * math.log2(math.e)

    def body(j, carry):
        acc, m_prev, l_prev = carry
        start = pl.multiple_of(blocks_ref[row * m_max + j] * kv_block, kv_block)
        if bits:  # the entry's head mask as one int32 word, bit h for query head h of the group
            use = ((hmask_ref[row * m_max + j] >> lax.broadcasted_iota(jnp.int32, (gp, 1), 0)) & 1) != 0
        else:
            use = hmask_ref[pl.ds((row * m_max + j) * gp, gp)][:, None] != 0
        k = rows(k_ref, start)
        s = pltriton.dot(q, k, trans_b=True) * qk_scale  # [Gp, bk] fp32
        k_pos = start + lax.broadcasted_iota(jnp.int32, (gp, kv_block), 1)
        vis = use & (k_pos <= q_pos) & ((k_pos < sink) | (q_pos - k_pos < window))
        return online_softmax.step_exp2(s, vis, acc, m_prev, l_prev,
                                         lambda: rows(v_ref, start), pltriton.dot)

    h = q.shape[-1]
    init = (jnp.zeros((gp, h), jnp.float32), jnp.full((gp,), online_softmax.NEG, jnp.float32), jnp.zeros((gp,), jnp.float32))
    acc, m, l = lax.fori_loop(lo, hi, body, init)
    safe = jnp.where(l > 0, l, 1.0)
    o_ref[...] = acc / safe[:, None]
    lse_ref[...] = jnp.where(l > 0, (m + jnp.log2(safe)) / math.log2(math.e), -jnp.inf)


def combine(o_parts, lse_parts):
    """Merge split partials: o_parts fp32 [..., splits, G, H], lse_parts [..., splits, G] -> ([..., G, H], [..., G])."""
    lse = jax.nn.logsumexp(lse_parts, axis=-2)
    w = jnp.where(jnp.isfinite(lse_parts), jnp.exp(lse_parts - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None, :]), 0.0)
    return (w[..., None] * o_parts).sum(-3), lse


def default_splits(batch: int, num_kv_heads: int, m_max: int, target_programs: int = 264) -> int:
    """Splits so that B · K · splits fills about two waves of an H100's 132 SMs (at most one per entry)."""
    return max(1, min(m_max, -(-target_programs // (batch * num_kv_heads))))


@functools.partial(jax.jit, static_argnames=("splits", "num_warps", "num_stages", "interpret"))
def sparse_decode_triton(q, k, v, plan: DecodePlan, *, layer=None, scale=None, splits: int | None = None,
                         num_warps: int = 4, num_stages: int = 2, interpret: bool = False):
    """q [B, N, H], k / v [B, S, K, H] (S a multiple of kv_block) -> (out [B, N, H] q.dtype, lse fp32 [B, N]).
    layer: None, or int32 [] — then k / v are a stack [L, B, S, K, H] read at that layer in place."""
    stacked = layer is not None
    s, kh = k.shape[-3], k.shape[-2]
    b, n, h, g, bk, m_max = kernel_dims(q, s, kh, plan)
    gp = max(16, 1 << (g - 1).bit_length())
    splits = splits or default_splits(b, kh, m_max)
    scale = h ** -0.5 if scale is None else scale
    pad_g = lambda x, fill: jnp.pad(x.reshape(*x.shape[:-1], kh, g), [(0, 0)] * (x.ndim - 1) + [(0, 0), (0, gp - g)],
                                    constant_values=fill)
    qp = jnp.pad(q.reshape(b, kh, g, h), ((0, 0), (0, 0), (0, gp - g), (0, 0)))
    bits = g <= 32  # head masks packed one word per union entry (G bytes -> 4), else one int32 per head
    if bits:
        hm = head_mask_words(plan).reshape(-1)
    else:
        hm = jnp.pad(plan.head_mask, ((0, 0), (0, 0), (0, 0), (0, gp - g))).astype(jnp.int32).reshape(-1)
    args = (plan.kv_blocks.reshape(-1), plan.counts.reshape(-1), hm, pad_g(plan.sinks, 0).reshape(-1),
            pad_g(plan.window, 0).reshape(-1), pad_g(plan.shifts(), 0).reshape(-1), plan.kv_len.astype(jnp.int32))
    whole = lambda x: pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)
    kernel = functools.partial(_kernel, scale=scale, kv_block=bk, m_max=m_max, gp=gp, num_kv=kh, splits=splits,
                               bits=bits, stacked=stacked)
    if stacked:
        args += (jnp.reshape(layer, (1,)).astype(jnp.int32),)
        kv_specs = [whole(k), whole(v)]
    else:
        kv_specs = [pl.BlockSpec((None, s, None, h), lambda bi, ki, si: (bi, 0, ki, 0)),
                    pl.BlockSpec((None, s, None, h), lambda bi, ki, si: (bi, 0, ki, 0))]
    o_parts, lse_parts = pl.pallas_call(
        kernel, grid=(b, kh, splits),
        in_specs=[whole(a) for a in args] + [pl.BlockSpec((None, None, gp, h), lambda bi, ki, si: (bi, ki, 0, 0))]
        + kv_specs,
        out_specs=[pl.BlockSpec((None, None, None, gp, h), lambda bi, ki, si: (bi, ki, si, 0, 0)),
                   pl.BlockSpec((None, None, None, gp), lambda bi, ki, si: (bi, ki, si, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, kh, splits, gp, h), jnp.float32),
                   jax.ShapeDtypeStruct((b, kh, splits, gp), jnp.float32)],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name="rtpurbo_sparse_decode",
    )(*args, qp, k, v)
    out, lse = combine(o_parts, lse_parts)  # [B, K, Gp, H], [B, K, Gp]
    return out[:, :, :g].reshape(b, n, h).astype(q.dtype), lse[:, :, :g].reshape(b, n)
