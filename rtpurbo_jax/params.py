"""One description of the parameter pytree drives random init, sharding and the converter's shape checks.

Layout (layers stacked on a leading axis L so the forward is one `lax.scan`):
    embed        [V, D]                      final_norm [D]          lm_head [D, V] (absent when tied)
    layers/attn_norm [L, D]  wq [L, D, N·H]  wk, wv [L, D, K·H]  wo [L, N·H, D]
           bq [L, N·H], bk, bv [L, K·H] (qkv_bias)   bo [L, D] (o_bias)   q_norm, k_norm [L, H] (qk_norm)
           mlp_norm [L, D]  w_gate, w_up [L, D, F]  w_down [L, F, D]
Matrices are stored [in, out] (transposed from PyTorch's [out, in]).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from rtpurbo_jax.model_config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]  # logical axes, one per dim
    init: str = "normal"  # normal | ones | zeros


# Logical axis -> mesh axis. Heads and the MLP hidden dim shard over `model`; the rest is replicated.
SHARDING_RULES = {"heads": "model", "kv_heads": "model", "mlp": "model", "vocab": None, "embed": None,
                  "layers": None, "head_dim": None}


def param_specs(cfg: ModelConfig) -> dict:
    L, D, V, F = cfg.num_layers, cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
    nh, kh = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    layers = {
        "attn_norm": ParamSpec((L, D), ("layers", "embed"), "ones"),
        "wq": ParamSpec((L, D, nh), ("layers", "embed", "heads")),
        "wk": ParamSpec((L, D, kh), ("layers", "embed", "kv_heads")),
        "wv": ParamSpec((L, D, kh), ("layers", "embed", "kv_heads")),
        "wo": ParamSpec((L, nh, D), ("layers", "heads", "embed")),
        "mlp_norm": ParamSpec((L, D), ("layers", "embed"), "ones"),
        "w_gate": ParamSpec((L, D, F), ("layers", "embed", "mlp")),
        "w_up": ParamSpec((L, D, F), ("layers", "embed", "mlp")),
        "w_down": ParamSpec((L, F, D), ("layers", "mlp", "embed")),
    }
    if cfg.qkv_bias:
        layers["bq"] = ParamSpec((L, nh), ("layers", "heads"))
        layers["bk"] = ParamSpec((L, kh), ("layers", "kv_heads"))
        layers["bv"] = ParamSpec((L, kh), ("layers", "kv_heads"))
    if cfg.o_bias:
        layers["bo"] = ParamSpec((L, D), ("layers", "embed"))
    if cfg.qk_norm:
        layers["q_norm"] = ParamSpec((L, cfg.head_dim), ("layers", "head_dim"), "ones")
        layers["k_norm"] = ParamSpec((L, cfg.head_dim), ("layers", "head_dim"), "ones")
    specs = {"embed": ParamSpec((V, D), ("vocab", "embed")), "layers": layers,
             "final_norm": ParamSpec((D,), ("embed",), "ones")}
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = ParamSpec((D, V), ("embed", "vocab"))
    return specs


def _is_spec(x):
    return isinstance(x, ParamSpec)


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32, scale: float = 0.02) -> dict:
    """Random params (normal(0, scale) matrices, ones for norms): for tests and speed benchmarks."""
    specs = param_specs(cfg)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
    keys = jax.random.split(key, len(leaves))

    def make(spec, k):
        if spec.init == "ones":
            return jnp.ones(spec.shape, dtype)
        return (scale * jax.random.normal(k, spec.shape, jnp.float32)).astype(dtype)

    return jax.tree.unflatten(treedef, [make(s, k) for s, k in zip(leaves, keys)])


def abstract_params(cfg: ModelConfig, dtype=jnp.float32) -> dict:
    """ShapeDtypeStruct pytree of the params (for `jax.eval_shape` and Orbax restore targets)."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), param_specs(cfg), is_leaf=_is_spec)


def param_shardings(cfg: ModelConfig, mesh, rules: dict | None = None) -> dict:
    """NamedSharding pytree from the logical axes and a rules table (axes missing from the mesh replicate)."""
    rules = SHARDING_RULES if rules is None else rules

    def to_sharding(spec: ParamSpec):
        axes = []
        for dim, name in zip(spec.shape, spec.axes):
            m = rules.get(name)
            ok = m is not None and m in mesh.shape and dim % mesh.shape[m] == 0
            axes.append(m if ok else None)
        return NamedSharding(mesh, P(*axes))

    return jax.tree.map(to_sharding, param_specs(cfg), is_leaf=_is_spec)
