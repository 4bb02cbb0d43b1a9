"""Prefill (indexer mode) tile block masses in one launch, Pallas with the Triton lowering (GPU).

What `reference._tile_block_mass` computes for one tile of query rows, for every tile at once: for each
(sequence, retrieval head, tile of `tile` rows) the mean over the tile's valid rows of each row's softmax mass
per key block. The reference materialises fp32 token scores [B, R, tile, S] per tile inside a `lax.map` over
tiles (at 128K on an H200 its selection made indexer prefill 3.4x slower than dense-retrieval prefill,
`benchmarks/results/e2e_h200_indexer_prefill.json`); here scores live in registers only:

- one program per (sequence, retrieval head, tile); pass 1 walks the key blocks a row of the tile can see and
  keeps each row's running max and sum (online softmax) -> the row's log-normaliser;
- pass 2 walks them again and adds exp(score - normaliser) of every visible (row, key) into its block's mass;
  blocks past the tile's last row write 0.

Local prior: `bias` [B, C, R] is added to the scores of keys in the tile's forced blocks (the reference adds it
to those blocks' log-mass: the same softmax). Scores are fp32 dots of I-dim index vectors (`pltriton.dot`
without TF32). The caller selects top-p on the masses (`api.prefill_selection`).

Layout: q_idx [B, C, R, I] (C a multiple of tile), k_idx [B, S, R, I] used in place (S a multiple of kv_block;
the api pads), q_pos int32 [B, C] with -1 for padding rows, kv_len int32 [B], forced int32 [B, Tb, Sb].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

_NEG = -1e30


def _kernel(kvlen_ref, qpos_ref, forced_ref, q_ref, bias_ref, k_ref, mass_ref, *, kv_block, num_blocks):
    b = pl.program_id(0)
    kv_len = kvlen_ref[b]
    q = q_ref[...].astype(jnp.float32)  # [tile, I]
    pos = qpos_ref[...]  # [tile]; -1: padding row
    q_pos = pos[:, None]  # [tile, 1]
    bias = bias_ref[...].astype(jnp.float32)[:, None]  # [tile, 1]
    row_ok = q_pos >= 0
    last = jnp.max(pos, axis=0)  # padding rows are -1
    hi = jnp.where(last >= 0, jnp.minimum(last + 1, kv_len) + kv_block - 1, 0) // kv_block  # blocks anyone sees
    tile = q.shape[0]

    def scores(j):
        start = pl.multiple_of(j * kv_block, kv_block)
        k = k_ref[pl.ds(start, kv_block), :].astype(jnp.float32)  # [bk, I]
        s = pltriton.dot(q, k, trans_b=True, allow_tf32=False)  # [tile, bk]
        s = s + jnp.where(forced_ref[j] != 0, bias, 0.0)
        k_pos = start + lax.broadcasted_iota(jnp.int32, (tile, kv_block), 1)
        vis = row_ok & (k_pos <= q_pos) & (k_pos < kv_len)
        return s, vis

    def normaliser(j, carry):
        m_prev, l_prev = carry
        s, vis = scores(j)
        m_new = jnp.maximum(m_prev, jnp.max(jnp.where(vis, s, _NEG), axis=1))
        l_new = l_prev * jnp.exp(m_prev - m_new) + jnp.sum(jnp.where(vis, jnp.exp(s - m_new[:, None]), 0.0), axis=1)
        return m_new, l_new

    m, l = lax.fori_loop(0, hi, normaliser, (jnp.full((tile,), _NEG, jnp.float32), jnp.zeros((tile,), jnp.float32)))
    lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), 0.0)[:, None]  # [tile, 1]
    n_valid = jnp.maximum(jnp.sum((pos >= 0).astype(jnp.float32), axis=0), 1.0)

    def block_mass(j, carry):  # the loops carry a value through only so that they lower (a store has no result)
        s, vis = scores(j)
        p = jnp.where(vis, jnp.exp(s - lse), 0.0)
        mass_ref[pl.ds(j, 1)] = (jnp.sum(jnp.sum(p, axis=1), axis=0) / n_valid).reshape(1)
        return carry

    lax.fori_loop(0, hi, block_mass, n_valid)

    def zero(j, carry):
        mass_ref[pl.ds(j, 1)] = jnp.zeros((1,), jnp.float32)
        return carry

    lax.fori_loop(hi, num_blocks, zero, n_valid)


@functools.partial(jax.jit, static_argnames=("tile", "kv_block", "num_warps", "interpret"))
def tile_block_mass_triton(q_idx, k_idx, q_pos, kv_len, forced, bias=None, *, tile: int, kv_block: int,
                           num_warps: int = 4, interpret: bool = False):
    """fp32 [B, R, Tb, Sb]: each tile's mean per-row softmax mass per key block (module docstring).

    q_idx fp32 [B, C, R, I]; k_idx [B, S, R, I] (S a multiple of kv_block); q_pos int [B, C] (-1 padding);
    kv_len int [B]; forced bool/int [B, Tb, Sb]; bias fp32 [B, C, R] or None (the local prior)."""
    b, c, r, i = q_idx.shape
    s = k_idx.shape[1]
    if c % tile or s % kv_block:
        raise ValueError(f"C={c} must be a multiple of tile={tile} and S={s} of kv_block={kv_block} (the api pads)")
    tb, sb = c // tile, s // kv_block
    bias = jnp.zeros((b, c, r), jnp.float32) if bias is None else bias.astype(jnp.float32)
    kvl = jnp.asarray(kv_len, jnp.int32)
    return pl.pallas_call(
        functools.partial(_kernel, kv_block=kv_block, num_blocks=sb), grid=(b, r, tb),
        in_specs=[pl.BlockSpec(kvl.shape, lambda *_: (0,)),
                  pl.BlockSpec((None, tile), lambda bi, ri, ti: (bi, ti)),
                  pl.BlockSpec((None, None, sb), lambda bi, ri, ti: (bi, ti, 0)),
                  pl.BlockSpec((None, tile, None, i), lambda bi, ri, ti: (bi, ti, ri, 0)),
                  pl.BlockSpec((None, tile, None), lambda bi, ri, ti: (bi, ti, ri)),
                  pl.BlockSpec((None, s, None, i), lambda bi, ri, ti: (bi, 0, ri, 0))],
        out_specs=pl.BlockSpec((None, None, None, sb), lambda bi, ri, ti: (bi, ri, ti, 0)),
        out_shape=jax.ShapeDtypeStruct((b, r, tb, sb), jnp.float32),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=interpret, name="rtpurbo_prefill_tile_block_mass",
    )(kvl, jnp.asarray(q_pos, jnp.int32), jnp.asarray(forced, jnp.int32), q_idx, bias, k_idx)
