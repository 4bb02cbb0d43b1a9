"""The platform's strong dense-attention baseline, so that every benchmark's speed-up has one meaning per device.

- NVIDIA GPUs: cuDNN through `jax.nn.dot_product_attention(implementation="cudnn")`;
- TPUs: splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`, the Pallas TPU flash kernel) for
  prefill-shaped calls (T = S, causal, optionally a sliding window); GQA runs as MQA per KV group;
  one-token decode calls use XLA's `dot_product_attention` (a single query row: no T x S scores to avoid);
- elsewhere (CPU checks of the scripts): XLA's `dot_product_attention`.

`dense_attention(q [B, T, N, H], k / v [B, S, K, H], ...)` -> [B, T, N, H]. The result's name is `name()`.
"""

from __future__ import annotations

import functools

import jax


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
