"""The flash-attention recurrence over visited key blocks, shared by the Triton and Mosaic TPU kernel bodies
(prefill and decode): one key block updates the running max m, denominator l and output accumulator acc.

Masked scores take a finite "minus infinity" (NEG) so that exp of (NEG - m) underflows to 0 without NaNs, and
a row that sees no key ends with l = 0: zeros out, lse -inf.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

NEG = -1e30


def step_exp2(s, vis, acc, m_prev, l_prev, load_v, dot):
    """Triton bodies (values in registers, scores pre-scaled by log2(e)): s fp32 [rows, bk], vis bool [rows, bk],
    acc fp32 [rows, H], m_prev / l_prev fp32 [rows]; load_v() loads the block's values [bk, H] (called after the
    softmax weights, where the kernels always loaded them); dot(p, v) the backend's matmul. Returns (acc, m, l)."""
    s = jnp.where(vis, s, NEG)
    m_next = jnp.maximum(m_prev, s.max(axis=-1))
    corr = jnp.exp2(m_prev - m_next)
    p = jnp.where(vis, jnp.exp2(s - m_next[:, None]), 0.0)
    v = load_v()
    acc = acc * corr[:, None] + dot(p.astype(v.dtype), v)
    return acc, m_next, l_prev * corr + p.sum(axis=-1)


def init_scratch(m_sc, l_sc, acc_sc):
    """Mosaic TPU bodies: reset the scratch state before a row's first key block."""
    m_sc[...] = jnp.full(m_sc.shape, NEG, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)


def step_scratch(s, vis, v, m_sc, l_sc, acc_sc):
    """Mosaic TPU bodies (state in VMEM scratch refs m_sc, l_sc [rows, 1], acc_sc [rows, H]): one key block of
    scores s fp32 [rows, bk] with visibility vis and values v [bk, H]."""
    s = jnp.where(vis, s, NEG)
    m_prev = m_sc[...]
    m_next = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))
    corr = jnp.exp(m_prev - m_next)
    p = jnp.where(vis, jnp.exp(s - m_next), 0.0)
    l_sc[...] = l_sc[...] * corr + p.sum(axis=-1, keepdims=True)
    acc_sc[...] = acc_sc[...] * corr + lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                                       preferred_element_type=jnp.float32)
    m_sc[...] = m_next


def finish_scratch(m_sc, l_sc, acc_sc, o_ref, lse_ref):
    """Write out = acc / l (zeros where l = 0) and lse = m + log l (-inf where l = 0) from the scratch refs,
    reshaped to the output blocks (a stacked [G · rows, ...] state into [G, rows, ...] blocks)."""
    l = l_sc[...]
    safe = jnp.where(l > 0, l, 1.0)
    o_ref[...] = (acc_sc[...] / safe).astype(o_ref.dtype).reshape(o_ref.shape)
    lse_ref[...] = jnp.where(l > 0, m_sc[...] + jnp.log(safe), -jnp.inf).reshape(lse_ref.shape)


def scratch_row_step(j, count, last, block_start: Callable[[], jax.Array], q_ref, k_ref, v_ref, scale, visible,
                     m_sc, l_sc, acc_sc, o_ref, lse_ref):
    """One grid step j of a Mosaic TPU kernel row (the innermost grid axis walks the row's plan entries): reset
    the scratch at j = 0; while j < count take the key block whose first token block_start() gives (a thunk:
    its plan entry is only read then), scoring q_ref [rows, H] against k_ref [bk, H] under
    visible(k_pos int32 [rows, bk]) -> bool; write the row at j = last."""

    @pl.when(j == 0)
    def _init():
        init_scratch(m_sc, l_sc, acc_sc)

    @pl.when(j < count)
    def _visit():
        q, k = q_ref[...], k_ref[...]
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
        k_pos = block_start() + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        step_scratch(s, visible(k_pos), v_ref[...], m_sc, l_sc, acc_sc)

    @pl.when(j == last)
    def _finish():
        finish_scratch(m_sc, l_sc, acc_sc, o_ref, lse_ref)
