"""Token sampling for `generate`: greedy, temperature, top-k and nucleus (top-p) sampling, jit-able."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 = greedy (argmax). top_k 0 = off. top_p 1 = off (keep the smallest set of tokens whose
    probability reaches top_p, at least one)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0 or self.temperature == float("inf"):  # NaN fails both comparisons
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):  # (NaN fails too)
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample(logits: jax.Array, key: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """int32 [B] next tokens from fp32 logits [B, V]."""
    if cfg.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    x = logits.astype(jnp.float32) / cfg.temperature
    if cfg.top_k:
        kth = jax.lax.top_k(x, min(cfg.top_k, x.shape[-1]))[0][..., -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    if cfg.top_p < 1.0:
        order = jnp.argsort(-x, axis=-1)
        p = jax.nn.softmax(jnp.take_along_axis(x, order, axis=-1), axis=-1)
        before = jnp.cumsum(p, axis=-1) - p
        drop_sorted = before >= cfg.top_p
        drop = jnp.put_along_axis(jnp.zeros_like(drop_sorted), order, drop_sorted, axis=-1, inplace=False)
        x = jnp.where(drop, -jnp.inf, x)
    return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)
