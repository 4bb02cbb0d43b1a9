"""The Llama / Qwen2 / Qwen3 / Mistral forward as pure functions over the params pytree (`rtpurbo_jax.params`).

The attention core is pluggable: `forward(..., attn_fn=...)` receives per layer the post-RoPE q, k, v, the
pre-RoPE q and k (after Qwen3's q/k norm; the indexer's inputs) and that layer's slice of `layer_data`
(e.g. head roles and indexer weights). The default is exact causal attention (`full_attention`).

Axes: B batch, T tokens, D model, N query heads, K KV heads, H head_dim, F MLP hidden, V vocab, L layers.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from rtpurbo_jax.attention import PLAN_NAME, AttentionCall, full_sequence_attention
from rtpurbo_jax.model_config import ModelConfig, RopeConfig

_HI = jax.lax.Precision.HIGHEST
# remat keeps only the attention plans (ints: a few MB per layer) and recomputes the rest
REMAT_POLICY = jax.checkpoint_policies.save_only_these_names(PLAN_NAME)
COLLECTABLE = ("q", "k", "v", "q_pre", "k_pre")


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """float32 [H/2] inverse frequencies for default, linear and llama3 RoPE (as transformers computes them)."""
    inv = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if rope.rope_type == "linear":
        inv = inv / rope.factor
    elif rope.rope_type == "llama3":
        old = rope.original_max_position_embeddings
        low_wl, high_wl = old / rope.low_freq_factor, old / rope.high_freq_factor
        wl = 2 * math.pi / inv
        scaled = np.where(wl > low_wl, inv / rope.factor, inv)
        smooth = (old / wl - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wl < high_wl) & ~(wl > low_wl)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def rope_cos_sin(positions: jax.Array, rope: RopeConfig, head_dim: int):
    """cos, sin float32 [B, T, H] for int positions [B, T] (half-split layout: freqs repeated twice)."""
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(rope_inv_freq(rope, head_dim))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, heads, H] rotated with the half-split convention; cos/sin [B, T, H] fp32."""
    h = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)
    c, s = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * c + rot * s


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in fp32, cast back to x.dtype, then scaled (transformers' order)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w * xf.astype(x.dtype)


def _dense(x, w, b=None):
    y = jnp.einsum("...d,df->...f", x, w, precision=_HI)
    return y if b is None else y + b


def project_qkv(lp: dict, x: jax.Array, cfg: ModelConfig, cos, sin):
    """Attention inputs of one layer. Returns dict q, k, v (post-RoPE) and q_pre, k_pre.

    q, q_pre: [B, T, N, H]; k, k_pre, v: [B, T, K, H]; dtype of x.
    """
    b, t, _ = x.shape
    q = _dense(x, lp["wq"], lp.get("bq")).reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = _dense(x, lp["wk"], lp.get("bk")).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = _dense(x, lp["wv"], lp.get("bv")).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q = rms_norm(q, lp["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, lp["k_norm"], cfg.rms_norm_eps)
    return {"q": apply_rope(q, cos, sin), "k": apply_rope(k, cos, sin), "v": v, "q_pre": q, "k_pre": k}


def mlp(lp: dict, x: jax.Array) -> jax.Array:
    return _dense(jax.nn.silu(_dense(x, lp["w_gate"])) * _dense(x, lp["w_up"]), lp["w_down"])


def full_attention(cfg: ModelConfig, lengths=None, chunk: int = 512, backend: str | None = "reference",
                   interpret: bool = False, mesh=None) -> Callable:
    """The default attention core: exact causal GQA attention (the config's sliding window, if any), through the
    planner and the block-sparse op like every other call (`attention.full_sequence_attention`: no SparseConfig,
    no retrieval head, one band plan). backend: the op's — "reference" (fp32 scores of every pair: the
    definition), "xla" / "triton" (differentiable), None (the Pallas kernel for the device: on Hopper Mosaic GPU
    when the plan fits it) or a name (`pallas_kernels.sparse_attention.api`); chunk: the reference's query rows
    per step; mesh: run per shard of a ("data", "model") mesh (`shard_map`: what a Pallas kernel on sharded
    inputs needs)."""
    call = AttentionCall(dense_retrieval=True, prefill_backend=backend, interpret=interpret, chunk=chunk)

    def attn(qkv, layer_data):
        del layer_data
        return full_sequence_attention(qkv["q"], qkv["k"], qkv["v"], lengths, cfg, call, mesh)

    return attn


def decoder_layer(lp: dict, x: jax.Array, cfg: ModelConfig, cos, sin, attend: Callable):
    """The one transformer block every path runs (the scanned forward, serving's prefill and decode):
    x + wo(attend(qkv(norm(x)))), then + mlp(norm(.)).

    lp: one layer's params; x [B, C, D]; cos, sin fp32 [B, C, H] (`rope_cos_sin` of the tokens' positions);
    attend(qkv) -> (out [B, C, N, H], aux) gets `project_qkv`'s dict. Returns (x [B, C, D], qkv, aux).
    """
    b, c, _ = x.shape
    qkv = project_qkv(lp, rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps), cfg, cos, sin)
    o, aux = attend(qkv)
    x = x + _dense(o.astype(x.dtype).reshape(b, c, cfg.num_heads * cfg.head_dim), lp["wo"], lp.get("bo"))
    x = x + mlp(lp, rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps))
    return x, qkv, aux


def forward(params: dict, tokens: jax.Array, cfg: ModelConfig, *, positions=None, lengths=None,
            attn_fn: Callable | None = None, layer_data=None, collect: tuple[str, ...] = (),
            return_hidden: bool = False, chunk: int = 512, remat: bool = False):
    """Logits fp32 [B, T, V] for int tokens [B, T].

    positions: int [B, T], default 0..T-1. lengths: int [B] valid tokens of right-padded rows (their padded
    positions produce finite but meaningless logits). attn_fn(qkv: dict, layer_data) -> [B, T, N, H];
    layer_data: pytree with a leading L axis, sliced per layer. collect: names from COLLECTABLE, returned
    stacked as dict name -> [L, B, T, heads, H]. Returns logits, or (logits, collected) when collect is set;
    return_hidden returns the final normed hidden states [B, T, D] instead of logits. remat: recompute each
    layer in the backward pass (`jax.checkpoint`): activation memory of one layer instead of all (training); the
    layer's attention plan is kept, not recomputed (`REMAT_POLICY`).
    """
    bad = set(collect) - set(COLLECTABLE)
    if bad:
        raise ValueError(f"collect names {sorted(bad)} unknown; choose from {COLLECTABLE}")
    b, t = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    attn_fn = attn_fn or full_attention(cfg, lengths, chunk)
    cos, sin = rope_cos_sin(positions, cfg.rope, cfg.head_dim)
    x = jnp.take(params["embed"], tokens, axis=0)

    def layer(x, xs):
        lp, ld = xs
        x, qkv, _ = decoder_layer(lp, x, cfg, cos, sin, lambda qkv: (attn_fn(qkv, ld), None))
        return x, {name: qkv[name] for name in collect}

    x, collected = jax.lax.scan(jax.checkpoint(layer, policy=REMAT_POLICY) if remat else layer, x,
                                (params["layers"], layer_data))
    x = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    out = x if return_hidden else logits_from_hidden(params, x, cfg)
    return (out, collected) if collect else out


def logits_from_hidden(params: dict, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """fp32 logits [..., V] from normed hidden states [..., D]."""
    w = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    return jnp.einsum("...d,dv->...v", x, w, precision=_HI, preferred_element_type=jnp.float32)


def logits_at(params: dict, x: jax.Array, cfg: ModelConfig, ids: jax.Array) -> jax.Array:
    """fp32 logits [..., k] at token ids int [..., k] from normed hidden states x [..., D]: the columns of
    `logits_from_hidden` at `ids`, O(k · D) per position instead of O(V · D)."""
    if cfg.tie_word_embeddings:
        rows = jnp.take(params["embed"], ids, axis=0)  # [..., k, D]
        return jnp.einsum("...d,...kd->...k", x, rows, precision=_HI, preferred_element_type=jnp.float32)
    cols = jnp.take(params["lm_head"], ids, axis=1)  # [D, ..., k]
    return jnp.einsum("...d,d...k->...k", x, cols, precision=_HI, preferred_element_type=jnp.float32)


def _by_rows(x: jax.Array, rows: int, fn, *beside: jax.Array):
    """fn over normed hidden states x [B, T, D], `rows` positions at a time (`lax.map` over the chunks, the last
    one padded): its outputs, a pytree of [B, rows, ...] arrays, joined back to [B, T, ...]. `beside`: [B, T]
    arrays chunked the same way (zero-padded) and passed to fn after the chunk of x."""
    b, t, d = x.shape
    rows = min(rows, t)
    n = -(-t // rows)
    chunks = lambda a: jnp.pad(a, ((0, 0), (0, n * rows - t)) + ((0, 0),) * (a.ndim - 2)).reshape(
        b, n, rows, *a.shape[2:]).swapaxes(0, 1)
    out = jax.lax.map(lambda xs: fn(*xs), (chunks(x), *map(chunks, beside)))  # [n, B, rows, ...]
    return jax.tree.map(lambda a: a.swapaxes(0, 1).reshape(b, n * rows, *a.shape[3:])[:, :t], out)


def topk_from_hidden(params: dict, x: jax.Array, cfg: ModelConfig, k: int, rows: int = 2048, lse: bool = False):
    """(ids int32 [B, T, k], logits fp32 [B, T, k]): the k largest logits, descending, of normed hidden states
    x [B, T, D], `rows` positions at a time — never the whole fp32 [B, T, V] (at 32K positions of a 152K vocab
    that is 20 GB before `top_k`'s own workspace). Equal to `jax.lax.top_k(logits_from_hidden(...), k)`. With
    lse: a third output, the logsumexp over the whole vocabulary, fp32 [B, T], from the same pass."""

    def one(xc):  # [B, rows, D]
        logits = logits_from_hidden(params, xc, cfg)
        vals, ids = jax.lax.top_k(logits, k)
        return (ids.astype(jnp.int32), vals) + ((jax.nn.logsumexp(logits, -1),) if lse else ())

    return _by_rows(x, rows, one)


def lse_from_hidden(params: dict, x: jax.Array, cfg: ModelConfig, rows: int = 2048, needed=None) -> jax.Array:
    """The logsumexp over the vocabulary of `logits_from_hidden`, fp32 [B, T], from normed hidden states
    x [B, T, D], `rows` positions at a time and differentiable: each chunk's logits are recomputed in the
    backward pass (`jax.checkpoint`), so neither pass holds more than [B, rows, V] of them. needed: None, or
    bool [B, T] — a chunk with no needed row in any sequence skips the vocabulary product (`lax.cond`, both
    passes) and holds 0 there (a loss on answer rows reads ~10 rows of a 32K window: 1 or 2 chunks of 16)."""
    one = jax.checkpoint(lambda xc: jax.nn.logsumexp(logits_from_hidden(params, xc, cfg), -1))
    if needed is None:
        return _by_rows(x, rows, one)
    skip = lambda xc: jnp.zeros(xc.shape[:2], jnp.float32)
    return _by_rows(x, rows, lambda xc, nc: jax.lax.cond(nc.any(), one, skip, xc), needed)
