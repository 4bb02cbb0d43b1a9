"""Public API: block-sparse attention over a BlockPlan with an explicit backend choice.

backend: "reference" (pure jnp, any platform; the definition) | "xla" (jnp walked block by block over the plan,
bf16 on tensor cores with fp32 accumulation, with its own VJP: the differentiable backend training uses, any
platform) | "mosaic_gpu" (Pallas Mosaic GPU, Hopper; the fast path) |
"triton" (Pallas Triton lowering, any CUDA GPU; portable) | "mosaic_tpu" (Pallas Mosaic TPU). None picks the
best available for the default device and plan (mosaic_gpu on sm90 when the plan has 128-row query tiles,
64/128-key blocks, head_dim 64/128 and 16-bit inputs; else triton on GPU) and logs the choice; a named backend
that cannot run raises, saying why. No silent fallback.
`interpret=True` runs a Pallas backend in interpret mode (CPU tests; GPU interpret mode for mosaic_gpu).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from pallas_kernels.block_plan import BlockPlan, cdiv, check_inputs, check_plan_values, is_concrete
from pallas_kernels.sparse_attention import reference

log = logging.getLogger(__name__)
BACKENDS = ("reference", "xla", "mosaic_gpu", "triton", "mosaic_tpu")
DIFFERENTIABLE = ("reference", "xla", "triton")


def _is_hopper() -> bool:
    dev = jax.devices()[0]
    return getattr(dev, "compute_capability", "").startswith("9.")


def default_backend(platform: str | None = None, q=None, k=None, plan: BlockPlan | None = None) -> str:
    """The backend None resolves to; with (q, k, plan) given, mosaic_gpu only where it supports them."""
    platform = platform or jax.default_backend()
    if platform in ("gpu", "cuda"):
        if q is not None and _is_hopper():
            from pallas_kernels.sparse_attention.mosaic_gpu import check_supported

            try:
                check_supported(q, k, plan)
                return "mosaic_gpu"
            except ValueError as why:
                log.info("block_sparse_attention: mosaic_gpu not used (%s)", why)
        return "triton"
    return {"tpu": "mosaic_tpu"}.get(platform, "reference")


def _check_backend(backend: str, interpret: bool, *inputs) -> None:
    """Refuse unknown names; on concrete `inputs` (an eager call) also a backend the default device cannot run.
    Under a trace the program may be lowered for another platform (`jax.export(..., platforms=["tpu"])` from a
    CPU host), so the platform is left to Pallas's own lowering check."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if inputs and not is_concrete(*inputs):
        return
    platform = jax.default_backend()
    need = {"triton": "gpu", "mosaic_gpu": "gpu", "mosaic_tpu": "tpu"}.get(backend)
    if need and not interpret and platform != need:
        raise RuntimeError(f"backend {backend!r} needs a {need.upper()} (default device is {platform}); "
                           "pass interpret=True to run it in interpret mode, or backend='reference'")


def block_sparse_attention(q, k, v, plan: BlockPlan, *, backend: str | None = None, interpret: bool = False,
                           scale=None, return_lse: bool = False, o_init=None):
    """Exact attention restricted to `plan` (see `reference.block_sparse_attention` for the contract).

    q [B, T, N, H]; k, v [B, S, K, H] -> out [B, T, N, H] (q.dtype) [, lse fp32 [B, N, T]].
    Lengths that are not multiples of the plan's blocks are padded here (padded keys lie past kv_len).
    Inputs must be floating point; outside jit the plan's block ids, counts and kv_len are range-checked.
    o_init: an output buffer aliased by the triton / mosaic_tpu backends (tests poison it with NaNs); mosaic_gpu
    ignores it (GPU interpret mode already starts fresh buffers as NaN), as do the jnp backends.
    """
    check_inputs(q, k, v, "block_sparse_attention")
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape or q.shape[2] % k.shape[2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"block_sparse_attention: q must be [B, T, N, H] and k, v [B, S, K, H] with N a multiple of "
                         f"K; got {q.shape}, {k.shape}, {v.shape}")
    check_plan_values(plan.kv_blocks, plan.counts, plan.kv_len, cdiv(k.shape[1], plan.kv_block), k.shape[1],
                      "block_sparse_attention plan")
    if backend is None:
        backend = default_backend(None, q, k, plan)
        log.info("block_sparse_attention: backend=%s (platform %s)", backend, jax.default_backend())
    _check_backend(backend, interpret, q)
    if backend == "reference":
        return reference.block_sparse_attention(q, k, v, plan, scale=scale, return_lse=return_lse)
    if backend == "xla":
        from pallas_kernels.sparse_attention.xla import block_sparse_attention_xla

        out, lse = block_sparse_attention_xla(q, k, v, plan, scale=scale)
        return (out, lse) if return_lse else out
    b, t, n, h = q.shape
    s = k.shape[1]
    tp, sp = cdiv(t, plan.q_block) * plan.q_block, cdiv(s, plan.kv_block) * plan.kv_block
    pad = lambda x, to: jnp.pad(x, ((0, 0), (0, to - x.shape[1]), (0, 0), (0, 0)))
    q, k, v = pad(q, tp), pad(k, sp), pad(v, sp)
    if o_init is not None:
        o_init = pad(o_init, tp)
    if backend == "mosaic_gpu":
        from pallas_kernels.sparse_attention.mosaic_gpu import block_sparse_attention_mosaic_gpu

        out, lse = block_sparse_attention_mosaic_gpu(q, k, v, plan, scale=scale, interpret=interpret)
    elif backend == "triton" and o_init is None:  # differentiable: the Pallas backward kernels as its VJP
        from pallas_kernels.sparse_attention.triton_bwd import block_sparse_attention_triton_vjp

        out, lse = block_sparse_attention_triton_vjp(q, k, v, plan, scale=scale, interpret=interpret)
    elif backend == "triton":
        from pallas_kernels.sparse_attention.triton import block_sparse_attention_triton

        out, lse = block_sparse_attention_triton(q, k, v, plan, scale=scale, interpret=interpret, o_init=o_init)
    else:
        from pallas_kernels.sparse_attention.mosaic_tpu import block_sparse_attention_tpu

        hm = lambda x: jnp.swapaxes(x, 1, 2)
        out, lse = block_sparse_attention_tpu(hm(q), hm(k), hm(v), plan, scale=scale, interpret=interpret,
                                              o_init=None if o_init is None else hm(o_init))
        out, lse = hm(out), lse[..., 0]
    out, lse = out[:, :t], lse[..., :t]
    return (out, lse) if return_lse else out
