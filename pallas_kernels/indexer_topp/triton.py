"""Decode indexer scoring fused with the per-block log-sum-exp, Pallas with the Triton lowering (GPU).

One program per (sequence, retrieval head, span of `bpp` key blocks): it loads the span's index keys
[bpp, kv_block, I] once, scores them against the head's index query (fp32, I-dim dot as multiply + sum), masks
positions at or past kv_len, and writes each block's log-sum-exp. Only [B, R, Sb] floats leave the kernel
(the XLA path materialises all [B, R, S] scores first). Exact top-p selection then runs on the block masses
(`decode_selection` in `api.py`).

Layout: k_idx [B, S, R, I] used in place through a free reshape to [B, Sb, kv_block, R, I]; S a multiple of
kv_block · bpp (the api pads with positions past kv_len).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton


def _kernel(kvlen_ref, q_ref, k_ref, lse_ref, *, kv_block, bpp):
    b, p = pl.program_id(0), pl.program_id(2)
    q = q_ref[...].astype(jnp.float32)  # [I]
    k = k_ref[...].astype(jnp.float32)  # [bpp, bk, I]
    s = (k * q[None, None, :]).sum(axis=-1)  # [bpp, bk]
    pos = (p * bpp + lax.broadcasted_iota(jnp.int32, (bpp, kv_block), 0)) * kv_block + \
        lax.broadcasted_iota(jnp.int32, (bpp, kv_block), 1)
    vis = pos < kvlen_ref[b]
    s = jnp.where(vis, s, -1e30)
    m = s.max(axis=-1)
    l = jnp.where(vis, jnp.exp(s - m[:, None]), 0.0).sum(axis=-1)
    lse_ref[...] = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)


@functools.partial(jax.jit, static_argnames=("kv_block", "bpp", "num_warps", "interpret"))
def block_lse_triton(q_idx, k_idx, kv_len, *, kv_block: int, bpp: int = 8, num_warps: int = 4,
                     interpret: bool = False):
    """q_idx [B, R, I], k_idx [B, S, R, I] (S a multiple of kv_block · bpp), kv_len int [B] ->
    block log-sum-exp fp32 [B, R, Sb] (-inf for blocks with no visible key)."""
    b, r, i = q_idx.shape
    s = k_idx.shape[1]
    if s % (kv_block * bpp):
        raise ValueError(f"S={s} must be a multiple of kv_block * bpp = {kv_block * bpp} (the api pads)")
    sb = s // kv_block
    k5 = k_idx.reshape(b, sb, kv_block, r, i)
    kvl = jnp.asarray(kv_len, jnp.int32)
    return pl.pallas_call(
        functools.partial(_kernel, kv_block=kv_block, bpp=bpp), grid=(b, r, sb // bpp),
        in_specs=[pl.BlockSpec(kvl.shape, lambda *_: (0,)),
                  pl.BlockSpec((None, None, i), lambda bi, ri, pi: (bi, ri, 0)),
                  pl.BlockSpec((None, bpp, kv_block, None, i), lambda bi, ri, pi: (bi, pi, 0, ri, 0))],
        out_specs=pl.BlockSpec((None, None, bpp), lambda bi, ri, pi: (bi, ri, pi)),
        out_shape=jax.ShapeDtypeStruct((b, r, sb), jnp.float32),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=interpret, name="rtpurbo_index_block_lse",
    )(kvl, q_idx, k5)
