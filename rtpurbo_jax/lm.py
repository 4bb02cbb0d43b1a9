"""The causal LM in `mode="full"` or `mode="rtpurbo"`: a pure `apply` plus a thin Flax NNX shell."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rtpurbo_jax.model import forward, full_attention
from rtpurbo_jax.model_config import ModelConfig
from rtpurbo_jax.attention import AttentionCall, retrieval_rows, sequence_attention
from rtpurbo_jax.indexer import check_indexer
from rtpurbo_jax.sparse_config import SparseConfig

MODES = ("full", "rtpurbo")


def rtpurbo_attn_fn(cfg: ModelConfig, sparse: SparseConfig, lengths=None, chunk: int = 512,
                    backend: str | None = "reference", interpret: bool = False, mesh=None):
    """`attn_fn` for `model.forward` running `attention.sequence_attention`; its layer_data is
    (roles bool [L, N], indexer dict of [L, N, ...] arrays or None[, r_heads int [L, R'] —
    `attention.retrieval_rows(roles)`: the selection runs for those heads only; without it, for all N]).
    mesh: run per shard of a ("data", "model") mesh (sequences over "data"; `attention.sequence_attention`)."""
    call = AttentionCall(decode=False, tile=sparse.q_block, dense_retrieval=sparse.prefill_mode != "indexer",
                         prefill_backend=backend, interpret=interpret, chunk=chunk)

    def attn(qkv, layer_data):
        roles, ix, *r_heads = layer_data
        return sequence_attention(qkv, roles, ix, sparse, cfg, call, lengths, *(r_heads or [None]), mesh=mesh)

    return attn


def apply(params: dict, tokens, cfg: ModelConfig, *, mode: str = "full", sparse: SparseConfig | None = None,
          indexer: dict | None = None, lengths=None, chunk: int = 512, attn_backend: str | None = "reference",
          mesh=None, **kw):
    """Logits fp32 [B, T, V] (or what `forward`'s options return) for tokens int [B, T].

    mode "rtpurbo" needs `sparse` (roles must fit the model) and, for prefill_mode "indexer", `indexer`
    (`rtpurbo_jax.indexer` layout). lengths int [B]: right padding. Semantics: `rtpurbo_jax.planner` — the
    same layer and planner serving runs, so `serving.prefill` of the same tokens gives the same logits.
    attn_backend: the block-sparse prefill op's backend, in both modes (full: one causal band plan).
    "reference" (default) is the definition (fp32 scores of every pair); "xla" walks the plan block by block
    (16-bit inputs on tensor cores, fp32 accumulation, its own VJP); "triton" (GPUs) has Pallas backward kernels:
    these three are differentiable (stage 2 trains through triton on GPUs, xla elsewhere). None picks the
    Pallas kernel for the device (inference; on an H100 the Mosaic GPU kernel when the plan fits it; the
    reference on CPUs), or name one (`pallas_kernels.sparse_attention.api`). mesh: run the attention per shard
    of a ("data", "model") mesh (`attention.sequence_attention`; sequences over "data", and in full mode heads
    over "model"): what a Pallas kernel on sharded inputs needs — without it XLA gathers the kernel's inputs and
    every device attends over the whole batch.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "full":
        return forward(params, tokens, cfg, lengths=lengths, chunk=chunk,
                       attn_fn=full_attention(cfg, lengths, chunk, attn_backend, mesh=mesh), **kw)
    if sparse is None:
        raise ValueError("mode='rtpurbo' needs a SparseConfig (sparse=...)")
    sparse.check_model(cfg.num_layers, cfg.num_heads, cfg.num_kv_heads)
    uses_indexer = sparse.prefill_mode == "indexer" and sparse.selector == "indexer"
    if indexer is None and uses_indexer:
        raise ValueError("prefill_mode='indexer' needs indexer weights (indexer={'w_q', 'w_k'})")
    if indexer is not None:
        check_indexer(indexer, cfg, sparse.index_dim)
    layer_data = (jnp.asarray(sparse.roles_array), indexer if uses_indexer else None,
                  jnp.asarray(retrieval_rows(sparse.roles_array)))
    return forward(params, tokens, cfg, lengths=lengths, layer_data=layer_data, chunk=chunk,
                   attn_fn=rtpurbo_attn_fn(cfg, sparse, lengths, chunk, attn_backend, mesh=mesh), **kw)


class CausalLM(nnx.Module):
    """NNX shell: owns the backbone params and the indexer; `__call__(tokens, mode=...)` calls `apply`."""

    def __init__(self, cfg: ModelConfig, params: dict, sparse: SparseConfig | None = None,
                 indexer: dict | None = None):
        self.cfg = cfg
        self.sparse = sparse
        self.params = nnx.data(jax.tree.map(nnx.Param, params))
        self.indexer = nnx.data(None if indexer is None else jax.tree.map(nnx.Param, indexer))

    def __call__(self, tokens, mode: str = "full", lengths=None):
        unbox = lambda t: None if t is None else jax.tree.map(lambda p: p[...], t, is_leaf=lambda x: isinstance(x, nnx.Variable))
        return apply(unbox(self.params), tokens, self.cfg, mode=mode, sparse=self.sparse,
                     indexer=unbox(self.indexer), lengths=lengths)
