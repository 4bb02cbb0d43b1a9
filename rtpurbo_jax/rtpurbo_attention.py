"""RTPurbo attention for one layer (prefill / full-sequence forward): a pure function plus a thin NNX shell.

Per query head n of the layer:
- local head (role 0): sinks + the last `window` tokens — a static band plan;
- retrieval head (role 1): dense causal attention (`prefill_mode="dense"`, the paper) or the indexer's top-p
  block plan per query tile (`prefill_mode="indexer"`, our extension);
- every head runs dense causal attention when the sequence is shorter than `seqlen_threshold`.
All heads then go through one exact block-sparse attention over the merged BlockPlan.

Indexer weights are stored for every query head of the layer, `w_q, w_k: [N, H, I]`; only retrieval heads
use them. Memory: the reference attention is O(B·N·chunk·S); plans O(B·N·Tb·Sb).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.block_plan import FULL_WINDOW, BlockPlan, band_selection, plan_from_selection
from pallas_kernels.indexer_topp.reference import index_keys, index_queries, topp_selection
from pallas_kernels.sparse_attention.reference import block_sparse_attention
from rtpurbo_jax.sparse_config import SparseConfig


def is_dense_length(seq_len: int, cfg: SparseConfig) -> bool:
    """True when the sequence is below `seqlen_threshold`: every head runs dense (RTP-LLM's switch)."""
    return cfg.seqlen_threshold > 0 and seq_len < cfg.seqlen_threshold


def layer_plan(qkv: dict, roles: jax.Array, w_q, w_k, cfg: SparseConfig, lengths=None) -> BlockPlan:
    """The merged BlockPlan of one layer.

    qkv: dict with q_pre [B, T, N, H], k_pre [B, S, K, H] (S == T, prefill from position 0).
    roles: bool [N] (traced is fine). w_q, w_k: [N, H, I]. lengths: int [B] valid tokens (right padding).
    """
    b, t, n, _ = qkv["q_pre"].shape
    s = qkv["k_pre"].shape[1]
    kv_len = jnp.full((b,), s, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
    qb, kb = cfg.q_block, cfg.kv_block
    dense_sel = band_selection(1, t, s, sinks=0, window=FULL_WINDOW, q_block=qb, kv_block=kb)[0]
    if is_dense_length(s, cfg):
        local_sel, local_sinks, local_win = dense_sel, 0, FULL_WINDOW
    else:
        local_sel = band_selection(1, t, s, sinks=cfg.sinks, window=cfg.window, q_block=qb, kv_block=kb)[0]
        local_sinks, local_win = cfg.sinks, cfg.window
    if cfg.prefill_mode == "indexer" and not is_dense_length(s, cfg):
        retr_sel = topp_selection(index_queries(qkv["q_pre"], w_q), index_keys(qkv["k_pre"], w_k), kv_len,
                                  top_p=cfg.top_p, q_block=qb, kv_block=kb, sinks=cfg.sinks,
                                  keep_recent=cfg.keep_recent, max_blocks=cfg.max_blocks)
    else:
        retr_sel = jnp.broadcast_to(jnp.asarray(dense_sel), (b, n) + dense_sel.shape)
    roles = jnp.asarray(roles, bool)
    sel = jnp.where(roles[None, :, None, None], retr_sel, jnp.asarray(local_sel)[None, None])
    sinks = jnp.where(roles, 0, local_sinks)
    window = jnp.where(roles, FULL_WINDOW, local_win)
    return plan_from_selection(sel, sinks=sinks, window=window, kv_len=kv_len, q_block=qb, kv_block=kb)


def rtpurbo_attention(qkv: dict, roles, w_q, w_k, cfg: SparseConfig, lengths=None, chunk: int = 512,
                      backend: str | None = "reference", interpret: bool = False):
    """RTPurbo attention output [B, T, N, H] (dtype of q) for one layer's q/k/v (post-RoPE) and q_pre/k_pre.

    backend: "reference" (jnp, differentiable, `chunk` query rows per step) or a Pallas backend of
    `pallas_kernels.sparse_attention.api` (None = the best one for the device; forward only). interpret: run a
    Pallas backend in interpret mode (CPU tests).
    """
    plan = layer_plan(qkv, roles, w_q, w_k, cfg, lengths)
    if backend == "reference":
        return block_sparse_attention(qkv["q"], qkv["k"], qkv["v"], plan, chunk=chunk)
    from pallas_kernels.sparse_attention.api import block_sparse_attention as kernel_attention

    return kernel_attention(qkv["q"], qkv["k"], qkv["v"], plan, backend=backend, interpret=interpret)


def rtpurbo_attn_fn(cfg: SparseConfig, lengths=None, chunk: int = 512, backend: str | None = "reference",
                    interpret: bool = False):
    """`attn_fn` for `rtpurbo_jax.model.forward`; its layer_data is (roles [L, N], w_q, w_k [L, N, H, I])."""

    def attn(qkv, layer_data):
        roles, w_q, w_k = layer_data
        return rtpurbo_attention(qkv, roles, w_q, w_k, cfg, lengths, chunk, backend, interpret)

    return attn


def init_indexer(num_layers: int, num_heads: int, head_dim: int, index_dim: int, key: jax.Array) -> dict:
    """Random indexer weights {w_q, w_k: fp32 [L, N, H, I]} (normal, std 1/sqrt(H)). Training picks better inits."""
    kq, kk = jax.random.split(key)
    shape = (num_layers, num_heads, head_dim, index_dim)
    std = head_dim ** -0.5
    return {"w_q": std * jax.random.normal(kq, shape, jnp.float32), "w_k": std * jax.random.normal(kk, shape, jnp.float32)}


class RTPurboAttention(nnx.Module):
    """NNX shell for one layer: owns the indexer params; roles and config are static."""

    def __init__(self, roles, head_dim: int, cfg: SparseConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.roles = nnx.static(tuple(bool(r) for r in np.asarray(roles)))
        n = len(self.roles)
        std = head_dim ** -0.5
        self.w_q = nnx.Param(std * jax.random.normal(rngs.params(), (n, head_dim, cfg.index_dim)))
        self.w_k = nnx.Param(std * jax.random.normal(rngs.params(), (n, head_dim, cfg.index_dim)))

    def __call__(self, qkv: dict, lengths=None):
        return rtpurbo_attention(qkv, jnp.asarray(self.roles), self.w_q[...], self.w_k[...], self.cfg, lengths)


def num_blocks_visited(plan: BlockPlan) -> jax.Array:
    """int [B, N]: key blocks a kernel visits per head over all query tiles (for density reports)."""
    return plan.counts.sum(-1)


def density(plan: BlockPlan, kv_len: int) -> jax.Array:
    """fp32 [B, N]: visited blocks / causal blocks (1.0 = dense causal)."""
    tb = plan.counts.shape[-1]
    causal = band_selection(1, tb * plan.q_block, kv_len, sinks=0, window=FULL_WINDOW, q_block=plan.q_block,
                            kv_block=plan.kv_block)[0].sum()
    return num_blocks_visited(plan) / max(int(causal), 1)


__all__ = ["RTPurboAttention", "density", "init_indexer", "is_dense_length", "layer_plan", "rtpurbo_attention",
           "rtpurbo_attn_fn"]
