"""The indexer (RTPurbo §4): one parameter spec, one projection per side, one layout.

Layout (on disk and in every API): a dict of fp32 arrays for **every query head** of every layer — only the
retrieval heads' rows are trained and read —
    w_q, w_k [L, N, H, I]   maps of the pre-RoPE q and k (after Qwen3's q/k norm) to I = index_dim dims
    w_local  [L, N, H]      optional local prior (a linear function of the pre-RoPE query) and its
    b_local  [L, N]         bias, added to the log-mass of the forced blocks (`pallas_kernels.indexer_topp`)
Derived views: `rows(indexer, layer, heads)` gives one layer's R heads ([R, H, I] ...), the layout serving and
stage-1 training work in; `full_layout` writes trained rows back.

Token score = project_queries(q_pre) · project_keys(k_pre) (no 1/sqrt scale: stage 1 learns the temperature).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rtpurbo_jax.model_config import ModelConfig
from rtpurbo_jax.params import ParamSpec

_HI = jax.lax.Precision.HIGHEST
NAMES = ("w_q", "w_k")
PRIOR = ("w_local", "b_local")


def indexer_specs(cfg: ModelConfig, index_dim: int, local_prior: bool = False) -> dict:
    """ParamSpec per indexer array (shape, logical axes, init) for a model; `local_prior` adds w_local, b_local."""
    L, N, H = cfg.num_layers, cfg.num_heads, cfg.head_dim
    specs = {"w_q": ParamSpec((L, N, H, index_dim), ("layers", "heads", "head_dim", None)),
             "w_k": ParamSpec((L, N, H, index_dim), ("layers", "heads", "head_dim", None))}
    if local_prior:
        specs["w_local"] = ParamSpec((L, N, H), ("layers", "heads", "head_dim"), "zeros")
        specs["b_local"] = ParamSpec((L, N), ("layers", "heads"), "zeros")
    return specs


def init_indexer(cfg: ModelConfig, index_dim: int, key: jax.Array, *, local_prior: bool = False) -> dict:
    """Random indexer weights (w_q, w_k normal with std 1/sqrt(H); the prior zeros). Stage 1 picks better inits
    (`train.objective.init_rows`)."""
    specs = indexer_specs(cfg, index_dim, local_prior)
    keys = jax.random.split(key, len(specs))
    std = cfg.head_dim ** -0.5
    return {name: (std * jax.random.normal(k, s.shape, jnp.float32) if s.init == "normal"
                   else jnp.zeros(s.shape, jnp.float32)) for (name, s), k in zip(specs.items(), keys)}


def check_indexer(indexer: dict, cfg: ModelConfig, index_dim: int) -> None:
    """Raise ValueError unless `indexer` holds w_q, w_k (and optionally both prior arrays) of the spec's shapes."""
    unknown = set(indexer) - set(NAMES + PRIOR)
    if unknown or ("w_local" in indexer) != ("b_local" in indexer):
        raise ValueError(f"indexer holds {sorted(indexer)}; expected w_q, w_k and optionally both w_local, b_local")
    specs = indexer_specs(cfg, index_dim, local_prior=True)
    for name, spec in specs.items():
        if name in NAMES and name not in indexer:
            raise ValueError(f"indexer {name} is missing (expected {spec.shape}: layers, q heads, head_dim, index_dim)")
        if name in indexer and tuple(indexer[name].shape) != spec.shape:
            raise ValueError(f"indexer {name} is {tuple(indexer[name].shape)}, expected {spec.shape}")


def key_groups(heads: np.ndarray, group: int) -> np.ndarray:
    """int [R]: for each retrieval head (heads int [R, 2]: layer, query head) the row of the first retrieval head
    reading the same KV head of the same layer (query head // group) — the row whose key map the heads of that KV
    group share under `--share-index-keys` (their index keys are then one array per KV group)."""
    first: dict = {}
    return np.asarray([first.setdefault((int(layer), int(head) // group), r) for r, (layer, head) in enumerate(heads)],
                      np.int32)


def _keys_and_groups(indexer: dict, roles: np.ndarray, num_kv_heads: int):
    """(w_k host copy [L, N, H, I], retrieval heads int [R, 2] (layer, query head), `key_groups` of them)."""
    heads = np.argwhere(np.asarray(roles, bool))
    return np.array(indexer["w_k"]), heads, key_groups(heads, roles.shape[1] // num_kv_heads)


def unshared_key_groups(indexer: dict, roles: np.ndarray, num_kv_heads: int) -> list[tuple[int, int]]:
    """(layer, KV head) pairs whose retrieval heads (roles bool [L, N]) hold different key maps w_k (a host read):
    empty when the indexer shares its key maps per KV group (`train.distill --share-index-keys`), the condition for
    `SparseConfig.shared_index_keys`."""
    w_k, heads, groups = _keys_and_groups(indexer, roles, num_kv_heads)
    rows = w_k[heads[:, 0], heads[:, 1]]  # [R, H, I]
    differ = ~(rows == rows[groups]).reshape(len(heads), -1).all(-1)
    g = roles.shape[1] // num_kv_heads
    return sorted({(int(layer), int(head) // g) for layer, head in heads[differ]})


def share_key_maps(indexer: dict, roles: np.ndarray, num_kv_heads: int) -> dict:
    """`indexer` with each KV group's retrieval heads (roles bool [L, N]) on the key map w_k of its first one
    (`key_groups`): the layout `train.distill --share-index-keys` trains, for `SparseConfig.shared_index_keys`
    (benchmarks with random indexers; tests)."""
    w_k, heads, groups = _keys_and_groups(indexer, roles, num_kv_heads)
    w_k[heads[:, 0], heads[:, 1]] = w_k[heads[groups, 0], heads[groups, 1]]
    return {**indexer, "w_k": jnp.asarray(w_k)}


def rows(indexer: dict, layer, heads) -> dict:
    """One layer's rows for query heads `heads` (int array [R]): w_q, w_k [R, H, I] (+ w_local [R, H],
    b_local [R]). `layer` may be traced."""
    heads = jnp.asarray(heads, jnp.int32)
    return {k: v[layer][heads] for k, v in indexer.items()}


def layer_rows(indexer: dict | None, layer, heads, head_dim: int, index_dim: int) -> dict | None:
    """`rows` of layer `layer`'s retrieval heads `heads` (int [R]; layer may be traced) for serving: zeros when
    no indexer is given (the retrieval heads run dense; their index keys are written but unused), None without
    retrieval heads."""
    if not len(heads):
        return None
    if indexer is not None:
        return rows(indexer, layer, heads)
    zero = jnp.zeros((len(heads), head_dim, index_dim), jnp.float32)
    return {"w_q": zero, "w_k": zero}


def full_layout(train: dict, heads: np.ndarray, cfg: ModelConfig) -> dict:
    """The full layout (zeros for untrained heads) from rows of heads (layer, q head) int [R, 2]."""
    out = {}
    for name, w in train.items():
        full = jnp.zeros((cfg.num_layers, cfg.num_heads) + tuple(w.shape[1:]), jnp.float32)
        out[name] = full.at[heads[:, 0], heads[:, 1]].set(w)
    return out


def project_queries(q_pre, w_q):
    """fp32 [..., R, I] index queries from pre-RoPE q [..., R, H] and w_q [R, H, I]."""
    return jnp.einsum("...rh,rhi->...ri", q_pre, w_q, precision=_HI, preferred_element_type=jnp.float32)


def project_keys(k_pre, w_k):
    """fp32 [..., R, I] index keys from pre-RoPE k [..., R, H] (each retrieval head's KV head, already gathered)
    and w_k [R, H, I]."""
    return jnp.einsum("...rh,rhi->...ri", k_pre, w_k, precision=_HI, preferred_element_type=jnp.float32)


def store_keys(keys, dtype):
    """Index keys as a cache of `dtype` holds them: cast, saturated at the dtype's largest finite value (float8
    e4m3 has no infinity: a plain cast would turn |x| > 448 into NaN)."""
    big = float(jnp.finfo(dtype).max)
    return jnp.clip(keys, -big, big).astype(dtype)


def group_keys(k_pre, num_heads: int, heads=None):
    """[B, S, R, H]: each query head's KV head's pre-RoPE keys from k_pre [B, S, K, H] (GQA: head n reads KV
    head n // (N / K)), the input of `project_keys` — for query heads `heads` (int [R], traced is fine), or
    all N = num_heads."""
    heads = jnp.arange(num_heads) if heads is None else jnp.asarray(heads, jnp.int32)
    return k_pre[:, :, heads // (num_heads // k_pre.shape[2])]


def local_prior(q_pre, ix: dict):
    """fp32 [..., R] local-prior bias from pre-RoPE q [..., R, H], or None when `ix` has no prior."""
    if "w_local" not in ix:
        return None
    return jnp.einsum("...rh,rh->...r", q_pre, ix["w_local"], precision=_HI,
                      preferred_element_type=jnp.float32) + ix["b_local"]


__all__ = ["check_indexer", "indexer_specs", "init_indexer", "local_prior", "project_keys", "project_queries",
           "key_groups", "share_key_maps", "unshared_key_groups",
           "full_layout", "layer_rows", "rows", "store_keys"]
