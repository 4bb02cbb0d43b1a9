"""Double-buffered DMA walk shared by the Mosaic TPU kernels (prefill and decode): the copies of step + 1 run
under the compute of step."""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl


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
