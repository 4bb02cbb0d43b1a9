"""Benchmark prefill plans built on the device in closed form, so 1M-token plans cost no host work or sorts.

Every (head, query tile) row is: the sink blocks below the window, then the blocks of the causal window band
[lo, diagonal] — all of them (density 1) or a stratified random subset at `density` (one block out of every
round(1/density), the diagonal block always kept). Rows are ascending, padded with their last id (the BlockPlan
contract). With density 1 the plan equals `band_plan` for the same sinks / window (tested).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_plan import FULL_WINDOW, BlockPlan, cdiv


def row_counts(t: int, *, qb: int, kb: int, sinks, window, stride) -> tuple[np.ndarray, ...]:
    """numpy int64 [N, Tb] (n_sink, lo, count_main, diagonal block) per row; `stride` [N] keeps one block in `stride`."""
    tb, sb = cdiv(t, qb), cdiv(t, kb)
    sinks, window, stride = (np.asarray(x, np.int64)[:, None] for x in (sinks, window, stride))
    q_lo = np.arange(tb, dtype=np.int64)[None] * qb
    hi = np.minimum((q_lo + qb - 1) // kb, sb - 1)
    lo = np.maximum(0, (q_lo - window + 1) // kb)
    n_sink = np.minimum(-(-sinks // kb), lo)
    count_main = (hi - lo) // stride + 1
    return n_sink, lo, count_main, hi


def causal_block_count(t: int, qb: int, kb: int) -> int:
    """Blocks a dense causal plan visits for one head."""
    _, _, count, _ = row_counts(t, qb=qb, kb=kb, sinks=[0], window=[FULL_WINDOW], stride=[1])
    return int(count.sum())


def band_plan_device(t: int, *, qb: int, kb: int, sinks, window, density, seed: int = 0) -> tuple[BlockPlan, int]:
    """(BlockPlan with B=1, visited blocks). sinks / window / density: per head [N] (FULL_WINDOW: no window)."""
    stride = np.maximum(1, np.round(1.0 / np.asarray(density, np.float64))).astype(np.int64)
    n_sink, lo, count_main, hi = row_counts(t, qb=qb, kb=kb, sinks=sinks, window=window, stride=stride)
    counts = n_sink + count_main
    m = int(counts.max())
    blocks = _rows(*(jnp.asarray(x, jnp.int32) for x in (n_sink, count_main, hi, lo, stride)), m=m, seed=seed,
                   jitter=bool(np.any(stride > 1)))
    plan = BlockPlan(kv_blocks=blocks[None], counts=jnp.asarray(counts, jnp.int32)[None],
                     sinks=jnp.asarray(sinks, jnp.int32), window=jnp.asarray(window, jnp.int32),
                     kv_len=jnp.asarray([t], jnp.int32), q_block=qb, kv_block=kb)
    return plan, int(counts.sum())


@functools.partial(jax.jit, static_argnames=("m", "seed", "jitter"))
def _rows(n_sink, count_main, hi, lo, stride, *, m: int, seed: int, jitter: bool):
    """int32 [N, Tb, m] block ids, one fused XLA computation (no [N, Tb, m] temporaries at 1M tokens)."""
    j = jnp.arange(m, dtype=jnp.int32)[None, None, :]
    ns, cm, hi_j, lo_j = (x[..., None] for x in (n_sink, count_main, hi, lo))
    st = stride[:, None, None]
    i = cm - 1 - (j - ns)  # distance (in strides) below the diagonal block
    off = jnp.zeros((), jnp.int32)
    if jitter:
        off = jax.random.randint(jax.random.key(seed), i.shape, 0, 2**30) % st
    off = jnp.where(i > 0, jnp.minimum(off, (hi_j - lo_j) - i * st), 0)
    blocks = jnp.where(j < ns, j, hi_j - i * st - off)
    last = jnp.where(cm > 0, hi_j, ns - 1)
    return jnp.where(j < ns + cm, blocks, last).astype(jnp.int32)


def layer_plan(kind: str, t: int, num_heads: int, *, qb: int = 128, kb: int = 128, density: float = 1.0,
               retrieval: int = 0, window: int = 8192, sinks: int = 4, seed: int = 0) -> tuple[BlockPlan, int]:
    """dense | random (all heads at density) | local (all heads sinks + window) | mix (`retrieval` heads dense
    or at density, the rest sinks + window; which heads are retrieval heads is drawn with `seed`)."""
    full = np.full(num_heads, FULL_WINDOW, np.int64)
    zero = np.zeros(num_heads, np.int64)
    if kind in ("dense", "random"):
        return band_plan_device(t, qb=qb, kb=kb, sinks=zero, window=full,
                                density=np.full(num_heads, density if kind == "random" else 1.0), seed=seed)
    if kind == "local":
        return band_plan_device(t, qb=qb, kb=kb, sinks=np.full(num_heads, sinks), window=np.full(num_heads, window),
                                density=np.ones(num_heads), seed=seed)
    if kind == "mix":
        ret = np.zeros(num_heads, bool)
        ret[np.random.default_rng(seed).choice(num_heads, retrieval, replace=False)] = True
        return band_plan_device(t, qb=qb, kb=kb, sinks=np.where(ret, 0, sinks), window=np.where(ret, full, window),
                                density=np.where(ret, density, 1.0), seed=seed)
    raise ValueError(f"unknown plan kind {kind!r}")
