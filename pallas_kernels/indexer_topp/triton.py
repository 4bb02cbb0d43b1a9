"""Decode indexer scoring fused with the per-block log-sum-exp, Pallas with the Triton lowering (GPU).

One program per (sequence, retrieval head, span of `bpp` key blocks): it loads the span's index keys
[bpp, kv_block, I] once, scores them against the head's index query (fp32, I-dim dot as multiply + sum), masks
positions at or past kv_len, and writes each block's log-sum-exp. Only [B, R, Sb] floats leave the kernel
(the XLA path materialises all [B, R, S] scores first). Exact top-p selection then runs on the block masses
(`decode_selection` in `api.py`).

Layout: k_idx [B, S, R, I] used in place through a free reshape to [B, Sb, kv_block, R, I]; S a multiple of
kv_block · bpp (the api pads with positions past kv_len). With `layer` (a stacked index cache [L, B, S, R, I],
int32 [] traced) the programs read layer `layer` of the stack in place (no copy of a scanned layer's slice).
Grouped queries, q_idx [B, K, G, I] against K key slots k_idx [B, S, K, I] (index keys shared by the G retrieval
heads of a KV group, `--share-index-keys`): one program per (sequence, slot, span) loads the span's keys once and
scores the G queries against them one after another, so each key is read once per slot instead of once per head.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton


def _kernel(*refs, kv_block, bpp, stacked):
    b, p = pl.program_id(0), pl.program_id(2)
    if stacked:  # the whole stack [L, B, Sb, bk, R, I]: this program's span of layer `layer`, in place
        kvlen_ref, layer_ref, q_ref, k_ref, lse_ref = refs
        k = k_ref[layer_ref[0], b, pl.ds(p * bpp, bpp), :, pl.program_id(1), :]
    else:
        kvlen_ref, q_ref, k_ref, lse_ref = refs
        k = k_ref[...]
    k = k.astype(jnp.float32)  # [bpp, bk, I]
    pos = (p * bpp + lax.broadcasted_iota(jnp.int32, (bpp, kv_block), 0)) * kv_block + \
        lax.broadcasted_iota(jnp.int32, (bpp, kv_block), 1)
    vis = pos < kvlen_ref[b]

    def block_lse(q):  # q fp32 [I] -> [bpp]
        s = jnp.where(vis, (k * q[None, None, :]).sum(axis=-1), -1e30)  # [bpp, bk]
        m = s.max(axis=-1)
        l = jnp.where(vis, jnp.exp(s - m[:, None]), 0.0).sum(axis=-1)
        return jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)

    if len(q_ref.shape) == 2:  # the G queries of one key slot, one after another over the keys loaded once (a
        for g in range(q_ref.shape[0]):  # [G, bpp, bk, I] product would hold G times the registers)
            lse_ref[g, :] = block_lse(q_ref[g, :].astype(jnp.float32))
    else:
        lse_ref[...] = block_lse(q_ref[...].astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=("kv_block", "bpp", "num_warps", "interpret"))
def block_lse_triton(q_idx, k_idx, kv_len, *, layer=None, kv_block: int, bpp: int = 8, num_warps: int = 4,
                     interpret: bool = False):
    """q_idx [B, R, I], k_idx [B, S, R, I] (S a multiple of kv_block · bpp), kv_len int [B] ->
    block log-sum-exp fp32 [B, R, Sb] (-inf for blocks with no visible key). Grouped: q_idx [B, K, G, I] (G a power
    of two) against k_idx [B, S, K, I] -> [B, K, G, Sb]. layer: None, or int32 [] — then k_idx is a stack
    [L, B, S, K, I] read at that layer in place."""
    grouped = q_idx.ndim == 4
    b, r, i = q_idx.shape[0], q_idx.shape[1], q_idx.shape[-1]
    gq = q_idx.shape[2] if grouped else None
    s = k_idx.shape[-3]
    if s % (kv_block * bpp):
        raise ValueError(f"S={s} must be a multiple of kv_block * bpp = {kv_block * bpp} (the api pads)")
    sb = s // kv_block
    kvl = jnp.asarray(kv_len, jnp.int32)
    if layer is None:
        args = (kvl, q_idx, k_idx.reshape(b, sb, kv_block, r, i))
        k_spec = pl.BlockSpec((None, bpp, kv_block, None, i), lambda bi, ri, pi: (bi, pi, 0, ri, 0))
    else:
        k6 = k_idx.reshape(k_idx.shape[0], b, sb, kv_block, r, i)
        args = (kvl, jnp.reshape(layer, (1,)).astype(jnp.int32), q_idx, k6)
        k_spec = pl.BlockSpec(k6.shape, lambda *_: (0,) * 6)
    return pl.pallas_call(
        functools.partial(_kernel, kv_block=kv_block, bpp=bpp, stacked=layer is not None), grid=(b, r, sb // bpp),
        in_specs=[pl.BlockSpec(x.shape, lambda *_: (0,)) for x in args[:-2]] + [
                  pl.BlockSpec((None, None, gq, i), lambda bi, ri, pi: (bi, ri, 0, 0)) if grouped else
                  pl.BlockSpec((None, None, i), lambda bi, ri, pi: (bi, ri, 0)), k_spec],
        out_specs=pl.BlockSpec((None, None, gq, bpp), lambda bi, ri, pi: (bi, ri, 0, pi)) if grouped else
        pl.BlockSpec((None, None, bpp), lambda bi, ri, pi: (bi, ri, pi)),
        out_shape=jax.ShapeDtypeStruct((b, r, gq, sb) if grouped else (b, r, sb), jnp.float32),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=interpret, name="rtpurbo_index_block_lse",
    )(*args)
