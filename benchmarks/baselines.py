"""The platform's strong dense-attention baseline, so that every benchmark's speed-up has one meaning per device.

- NVIDIA GPUs: cuDNN through `jax.nn.dot_product_attention(implementation="cudnn")`;
- TPUs: splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`, the Pallas TPU flash kernel) for
  prefill-shaped calls (T = S, causal, optionally a sliding window); GQA runs as MQA per KV group;
  one-token decode calls use XLA's `dot_product_attention` (a single query row: no T x S scores to avoid);
- elsewhere (CPU checks of the scripts): XLA's `dot_product_attention`.

`dense_attention(q [B, T, N, H], k / v [B, S, K, H], ...)` -> [B, T, N, H]. The result's name is `name()`.

`fa2_attention`: the FA2-class baseline the paper's speed-ups are quoted against — the Pallas Triton flash
attention JAX ships (`jax.experimental.pallas.ops.gpu.attention.mha`), for one-layer prefill comparisons with the
paper's curve (issue 17); a second baseline beside the strong one, never instead of it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


# RTPurbo's one-layer prefill speed-up against FA2 (H20), 32K -> 1M: the paper's table (exp.tex), every length
PAPER_PREFILL_VS_FA2 = {32768: 2.83, 65536: 4.25, 131072: 5.92, 262144: 7.47, 524288: 8.62, 1 << 20: 9.36}


def name(platform: str | None = None) -> str:
    """"cudnn" | "splash" | "xla": the baseline `dense_attention` runs on `platform` (default: the device's)."""
    platform = platform or jax.default_backend()
    return {"gpu": "cudnn", "cuda": "cudnn", "tpu": "splash"}.get(platform, "xla")


@functools.lru_cache(maxsize=None)
def _splash_kernel(t: int, group: int, window: int | None, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    one = sm.CausalMask((t, t)) if window is None else sm.LocalMask((t, t), (window - 1, 0), offset=0)
    blk = min(512, t)
    sizes = sk.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk)
    return sk.make_splash_mqa_single_device(sm.MultiHeadMask([one] * group), block_sizes=sizes, interpret=interpret)


def splash_attention(q, k, v, *, window: int | None = None, interpret: bool = False):
    """Causal (or causal sliding-window) attention by splash attention, GQA as MQA per KV group.

    q [B, T, N, H], k / v [B, T, K, H] -> [B, T, N, H] in q.dtype. T a multiple of 128 (splash's tiles)."""
    b, t, n, h = q.shape
    kh = k.shape[2]
    g = n // kh
    kern = _splash_kernel(t, g, window, interpret)
    qg = (q * h ** -0.5).astype(q.dtype).reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
    kk, vv = (x.transpose(0, 2, 1, 3) for x in (k, v))  # [B, K, T, H]
    out = jax.vmap(jax.vmap(kern))(qg, kk, vv)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q.dtype)


def dense_attention(q, k, v, *, causal: bool = True, window: int | None = None, kv_lengths=None,
                    platform: str | None = None, interpret: bool = False):
    """The platform's baseline attention (module docstring). window: a causal sliding window of that many keys
    (the query's own included); kv_lengths int [B]: valid keys per sequence (decode over a padded cache)."""
    base = name(platform)
    local = None if window is None else (window - 1, 0)
    if base == "splash" and kv_lengths is None and causal and q.shape[1] == k.shape[1]:
        return splash_attention(q, k, v, window=window, interpret=interpret)
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, key_value_seq_lengths=kv_lengths,
                                        local_window_size=local, implementation="cudnn" if base == "cudnn" else None)


def fa2_attention(q, k, v, *, causal: bool = True, interpret: bool = False, block_q: int = 128,
                  block_k: int = 128):
    """Causal flash attention by the Pallas Triton kernel JAX ships (FlashAttention-2's algorithm: one program per
    (query tile, sequence, head), online softmax over key tiles). q [B, T, N, H], k / v [B, S, N, H] -> [B, T, N,
    H] in q.dtype, scaled by H^-0.5; T and S multiples of the tiles (128 by default, or the length if shorter).
    The kernel has no GQA: pass K / V with their heads repeated to N (`repeat_kv`), done once outside any timing
    (FA2 reads a KV head once per query head as well). JAX 0.11 marks the module deprecated in favour of tokamax
    (a DeprecationWarning at import); when it goes, tokamax's Triton flash attention is the replacement."""
    from jax.experimental.pallas.ops.gpu import attention as pallas_gpu_attention

    if k.shape[2] != q.shape[2] or v.shape[2] != q.shape[2]:
        raise ValueError(f"fa2_attention needs K / V with the query's {q.shape[2]} heads (repeat_kv), got "
                         f"{k.shape[2]} and {v.shape[2]}")
    sizes = pallas_gpu_attention.BlockSizes(block_q=block_q, block_k=block_k)
    return pallas_gpu_attention.mha(q, k, v, None, sm_scale=q.shape[-1] ** -0.5, causal=causal,
                                    block_sizes=sizes, interpret=interpret)


def repeat_kv(x, num_heads: int):
    """[B, S, K, H] -> [B, S, num_heads, H]: each KV head repeated for its group of query heads (GQA -> MHA)."""
    return jnp.repeat(x, num_heads // x.shape[2], axis=2)
