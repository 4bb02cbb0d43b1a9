"""DMA helpers shared by the Mosaic TPU kernels (prefill and decode): a plan row copied into SMEM, and a
double-buffered walk over plan entries whose K/V rows are gathered into one VMEM tile per step (the copies of
step + 1 run under the compute of step)."""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


def copy_in(*copies) -> None:
    """Start the async copies (`pltpu.make_async_copy`), then wait for every one."""
    for c in copies:
        c.start()
    for c in copies:
        c.wait()


def walk_double_buffered(count, copies: Callable, visit: Callable) -> None:
    """Run visit(step, slot) for step in [0, count) (traced count) with step's data in buffer slot = step % 2.

    copies(step, slot) -> the async-copy descriptors (`pltpu.make_async_copy`) that bring step's data into
    buffer `slot`; they are started one step ahead and waited on before visit."""

    @pl.when(count > 0)
    def _first():
        for c in copies(0, 0):
            c.start()

    def body(step, carry):
        slot = lax.rem(step, jnp.int32(2))

        @pl.when(step + 1 < count)
        def _next():
            for c in copies(step + 1, 1 - slot):
                c.start()

        for c in copies(step, slot):
            c.wait()
        visit(step, slot)
        return carry

    lax.fori_loop(0, count, body, 0)


def walk_gathered(count, gather: int, span: int, entry_key: Callable, k_src, v_src, k_buf, v_buf, sem,
                  visit: Callable) -> None:
    """Walk `count` plan entries (traced) `gather` at a time: the `span` keys of each entry, from its first key
    entry_key(e) (traced int32), are copied from k_src / v_src (HBM refs [S, H] of this sequence and group)
    into one [gather · span, H] tile of k_buf / v_buf (VMEM [2, gather · span, H], double-buffered; sem: DMA
    semaphores [2, 2]). visit(slot, entries) then sees the tile in buffer `slot`; entries lists (e, live) per
    column group: past the list the last entry is re-read and live is False (the caller masks it out)."""
    steps = lax.div(count + (gather - 1), jnp.int32(gather))
    entry = lambda step, i: jnp.minimum(step * gather + i, jnp.maximum(count - 1, 0))

    def copies(step, slot):
        out = []
        for i in range(gather):
            start = pl.multiple_of(entry_key(entry(step, i)), span)
            src, dst = pl.ds(start, span), pl.ds(i * span, span)
            out += [pltpu.make_async_copy(k_src.at[src], k_buf.at[slot, dst], sem.at[0, slot]),
                    pltpu.make_async_copy(v_src.at[src], v_buf.at[slot, dst], sem.at[1, slot])]
        return out

    walk_double_buffered(steps, copies, lambda step, slot: visit(
        slot, [(entry(step, i), step * gather + i < count) for i in range(gather)]))


def entry_columns(shape: tuple[int, int], span: int, entries, entry_key: Callable, entry_word: Callable):
    """(k_pos, word) int32 `shape` [rows, gather · span] for a tile of `walk_gathered`: each column's key
    position and its entry's mask word (0 for entries past the list)."""
    c_iota = lax.broadcasted_iota(jnp.int32, shape, 1)
    col_entry = lax.div(c_iota, jnp.int32(span))  # lax.div / rem: no sign op on TPU
    k_pos = lax.rem(c_iota, jnp.int32(span))
    word = jnp.zeros(shape, jnp.int32)
    for i, (e, live) in enumerate(entries):
        k_pos = jnp.where(col_entry == i, entry_key(e) + k_pos, k_pos)
        word = jnp.where(col_entry == i, jnp.where(live, entry_word(e), 0), word)
    return k_pos, word
