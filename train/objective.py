"""Stage-1 objective (RTPurbo eq. 6): forward KL from each retrieval head's exact attention to its indexer.

Trainable params are only the retrieval heads' maps, stacked over the R (layer, head) pairs:
`{"w_q": [R, H, I], "w_k": [R, H, I]}` (fp32). Teacher: the frozen model's post-RoPE q, k of that head,
softmax(q·k / sqrt(H)) over all causal keys (sinks and local tokens included: the full token-level
distribution, as the paper states). Student: softmax over the same keys of (q_pre W_q)·(k_pre W_k), pre-RoPE
inputs. Every query position enters the loss (position 0 has a one-key distribution and contributes 0).
The loss is summed over retrieval heads and averaged over batch and positions. Queries are processed in
chunks: memory O(R · B · chunk · S), never S².

Axes: R retrieval heads, B batch, T = S sequence, H head_dim, I index_dim, C chunk, Sb key blocks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_plan import cdiv
from pallas_kernels.indexer_topp.reference import topp_select
from rtpurbo_jax.model import rope_inv_freq
from rtpurbo_jax.model_config import ModelConfig

_HI = jax.lax.Precision.HIGHEST
INITS = ("random", "pca", "rope_lowfreq")


def gather_heads(collected: dict, heads: np.ndarray, group: int) -> dict:
    """Per retrieval head [R, B, T, H] arrays (q, k, q_pre, k_pre) from `forward(..., collect=...)` output.

    heads: int [R, 2] (layer, query head). k arrays use the head's KV head (query head // group).
    """
    layer, head = jnp.asarray(heads[:, 0]), jnp.asarray(heads[:, 1])
    out = {}
    for name in ("q", "q_pre"):
        out[name] = collected[name][layer, :, :, head]
    for name in ("k", "k_pre"):
        out[name] = collected[name][layer, :, :, head // group]
    return out


def _chunk_logits(chunk_start, chunk, heads_x, train, scale):
    """Teacher and student logits fp32 [R, B, C, S] for queries [chunk_start, chunk_start + chunk)."""
    q = jax.lax.dynamic_slice_in_dim(heads_x["q"], chunk_start, chunk, axis=2)
    qp = jax.lax.dynamic_slice_in_dim(heads_x["q_pre"], chunk_start, chunk, axis=2)
    t_logits = jnp.einsum("rbch,rbsh->rbcs", q, heads_x["k"], precision=_HI,
                          preferred_element_type=jnp.float32) * scale
    qi = jnp.einsum("rbch,rhi->rbci", qp.astype(jnp.float32), train["w_q"], precision=_HI)
    ki = jnp.einsum("rbsh,rhi->rbsi", heads_x["k_pre"].astype(jnp.float32), train["w_k"], precision=_HI)
    s_logits = jnp.einsum("rbci,rbsi->rbcs", qi, ki, precision=_HI)
    return t_logits, s_logits


def _causal(chunk_start, chunk, s, t):
    rows = chunk_start + jnp.arange(chunk)
    return (jnp.arange(s)[None, :] <= rows[:, None]) & (rows < t)[:, None]


def kl_loss(train: dict, heads_x: dict, chunk: int = 256):
    """Mean over (batch, position) of the KL summed over retrieval heads; fp32 scalar."""
    r, b, t, h = heads_x["q"].shape
    chunk = min(chunk, t)
    nc = cdiv(t, chunk)
    pad = nc * chunk - t
    padded = {k: jnp.pad(v, ((0, 0), (0, 0), (0, pad), (0, 0))) if k.startswith("q") else v for k, v in heads_x.items()}

    def one(ci):
        start = ci * chunk
        tl, sl = _chunk_logits(start, chunk, padded, train, h ** -0.5)
        mask = _causal(start, chunk, t, t)[None, None]
        log_p = jax.nn.log_softmax(jnp.where(mask, tl, -jnp.inf), axis=-1)
        log_q = jax.nn.log_softmax(jnp.where(mask, sl, -jnp.inf), axis=-1)
        p = jnp.exp(log_p)
        kl = jnp.where(mask, p * (log_p - log_q), 0.0).sum(-1)  # [R, B, C]
        return kl.sum(0).sum()

    return jax.lax.map(one, jnp.arange(nc)).sum() / (b * t)


def recall_metrics(train: dict, heads_x: dict, *, top_p: float = 0.9, kv_block: int = 64, probe: int = 128) -> dict:
    """For the last `probe` query positions: teacher mass inside the indexer's top-p block set (recall), the
    fraction of visible blocks it selects, and the same fraction for the oracle (teacher's own top-p set)."""
    r, b, t, h = heads_x["q"].shape
    probe = min(probe, t)
    start = t - probe
    tl, sl = _chunk_logits(start, probe, heads_x, train, h ** -0.5)
    mask = _causal(start, probe, t, t)[None, None]
    p_t = jax.nn.softmax(jnp.where(mask, tl, -jnp.inf), axis=-1)
    p_s = jax.nn.softmax(jnp.where(mask, sl, -jnp.inf), axis=-1)
    sb = cdiv(t, kv_block)
    blk = lambda x: jnp.pad(x, [(0, 0)] * 3 + [(0, sb * kv_block - t)]).reshape(*x.shape[:3], sb, kv_block).sum(-1)
    bt, bs = blk(p_t), blk(p_s)
    vis = blk(mask.astype(jnp.float32) * jnp.ones_like(p_t)) > 0
    none = jnp.zeros_like(vis)
    sel = topp_select(bs, vis, none, top_p)
    oracle = topp_select(bt, vis, none, top_p)
    nvis = vis.sum(-1)
    return {"recall": (bt * sel).sum(-1).mean(), "selected_frac": (sel.sum(-1) / nvis).mean(),
            "oracle_frac": (oracle.sum(-1) / nvis).mean()}


def init_indexer(kind: str, heads: np.ndarray, cfg: ModelConfig, index_dim: int, key, calib_x: dict | None = None):
    """Initial {w_q, w_k: fp32 [R, H, I]}.

    random: normal(0, 1/sqrt(H)). rope_lowfreq: select the I dims of the I/2 lowest-frequency rotary pairs
    (half-split layout: pair j = dims j and j + H/2), scaled by H^-1/4 each side so the score equals the
    teacher's low-frequency part of q·k/sqrt(H) at distance 0. pca: per head, the top-I right singular vectors
    of the stacked pre-RoPE q and k rows of calibration text (`calib_x` from `gather_heads`), same scale.
    """
    r, h = len(heads), cfg.head_dim
    if kind not in INITS:
        raise ValueError(f"--init must be one of {INITS}, got {kind!r}")
    if index_dim > h:
        raise ValueError(f"index_dim {index_dim} exceeds head_dim {h}")
    if kind == "random":
        kq, kk = jax.random.split(key)
        return {"w_q": h ** -0.5 * jax.random.normal(kq, (r, h, index_dim)),
                "w_k": h ** -0.5 * jax.random.normal(kk, (r, h, index_dim))}
    if kind == "rope_lowfreq":
        if index_dim % 2:
            raise ValueError("rope_lowfreq init needs an even index_dim")
        order = np.argsort(rope_inv_freq(cfg.rope, h))[: index_dim // 2]  # lowest frequencies first
        dims = np.concatenate([order, order + h // 2])
        w = np.zeros((h, index_dim), np.float32)
        w[dims, np.arange(index_dim)] = h ** -0.25
        w = jnp.broadcast_to(jnp.asarray(w), (r, h, index_dim))
        return {"w_q": w, "w_k": jnp.array(w, copy=True)}  # distinct buffers (the step donates both)
    if calib_x is None:
        raise ValueError("pca init needs calibration activations")
    rows = jnp.concatenate([calib_x["q_pre"], calib_x["k_pre"]], axis=2).reshape(r, -1, h).astype(jnp.float32)
    _, _, vt = jnp.linalg.svd(rows, full_matrices=False)
    w = jnp.swapaxes(vt[:, :index_dim], 1, 2) * h ** -0.25
    return {"w_q": w, "w_k": jnp.array(w, copy=True)}


def scatter_indexer(train: dict, heads: np.ndarray, cfg: ModelConfig) -> dict:
    """Full-model indexer {w_q, w_k: [L, N, H, I]} (zeros for local heads) from the trained [R, H, I] maps."""
    i = train["w_q"].shape[-1]
    out = {}
    for name, w in train.items():
        full = jnp.zeros((cfg.num_layers, cfg.num_heads, cfg.head_dim, i), jnp.float32)
        out[name] = full.at[heads[:, 0], heads[:, 1]].set(w)
    return out
