"""The causal LM in `mode="full"` or `mode="rtpurbo"`: a pure `apply` plus a thin Flax NNX shell."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rtpurbo_jax.model import forward
from rtpurbo_jax.model_config import ModelConfig
from rtpurbo_jax.rtpurbo_attention import init_indexer, rtpurbo_attn_fn
from rtpurbo_jax.sparse_config import SparseConfig

MODES = ("full", "rtpurbo")


def apply(params: dict, tokens, cfg: ModelConfig, *, mode: str = "full", sparse: SparseConfig | None = None,
          indexer: dict | None = None, lengths=None, chunk: int = 512, attn_backend: str | None = "reference",
          **kw):
    """Logits fp32 [B, T, V] (or what `forward`'s options return) for tokens int [B, T].

    mode "rtpurbo" needs `sparse` (roles must fit the model) and, for prefill_mode "indexer", `indexer`
    ({w_q, w_k: [L, N, H, I]}). lengths int [B]: right padding.
    attn_backend: the block-sparse attention backend of the rtpurbo layers. "reference" (default) is the jnp path
    and the only differentiable one (training); None picks the Pallas kernel for the device (inference; on an
    H100 the Mosaic GPU kernel when the plan fits it), or name one (`pallas_kernels.sparse_attention.api`).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "full":
        return forward(params, tokens, cfg, lengths=lengths, chunk=chunk, **kw)
    if sparse is None:
        raise ValueError("mode='rtpurbo' needs a SparseConfig (sparse=...)")
    sparse.check_model(cfg.num_layers, cfg.num_heads, cfg.num_kv_heads)
    if indexer is None:
        if sparse.prefill_mode == "indexer":
            raise ValueError("prefill_mode='indexer' needs indexer weights (indexer={'w_q', 'w_k'})")
        indexer = jax.tree.map(jnp.zeros_like, init_indexer(cfg.num_layers, cfg.num_heads, cfg.head_dim,
                                                             sparse.index_dim, jax.random.key(0)))
    want = (cfg.num_layers, cfg.num_heads, cfg.head_dim, sparse.index_dim)
    for name in ("w_q", "w_k"):
        if tuple(indexer[name].shape) != want:
            raise ValueError(f"indexer {name} has shape {tuple(indexer[name].shape)}, expected {want}")
    layer_data = (jnp.asarray(sparse.roles_array), indexer["w_q"], indexer["w_k"])
    return forward(params, tokens, cfg, lengths=lengths, attn_fn=rtpurbo_attn_fn(sparse, lengths, chunk, attn_backend),
                   layer_data=layer_data, chunk=chunk, **kw)


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
