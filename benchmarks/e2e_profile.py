"""Where the time of one serving step goes (`python -m benchmarks.e2e --profile-prefill / --profile-decode`):
the parts of one rtpurbo prefill chunk timed apart, and the device time per kernel of `serving.decode_step` next
to the dense cuDNN decode (JAX profiler trace -> perfetto events summed per kernel name). Same model and configs
as `benchmarks.e2e`, the cache filled with random values.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.e2e import calibrate, dense_decode_fn, model_config, sparse_config, timed_steps
from rtpurbo_jax.indexer import init_indexer
from rtpurbo_jax.kv_cache import init_cache
from rtpurbo_jax.model import decoder_layer, project_qkv, rope_cos_sin
from rtpurbo_jax.params import init_params
from rtpurbo_jax.serving import decode_step


def decode_copies(cfg, sparse, params, t: int) -> list[str]:
    """Copies of 1 MiB or more in the optimized program of `serving.decode_step` (2 layers, cache of t + 256
    positions): each is bytes moved per step that a donated, in-place cache would not need."""
    import re

    from rtpurbo_jax import serving

    cache = jax.eval_shape(lambda: init_cache(cfg, 1, t + 256, sparse, jnp.bfloat16))
    ix = init_indexer(cfg, sparse.index_dim, jax.random.key(1))
    text = serving._decode_jit.lower(params, cache, jnp.zeros((1,), jnp.int32), ix, cfg=cfg, sparse=sparse,
                                     backend=serving.op_backends(None), interpret=False,
                                     stats=False).compile().as_text()
    big = []
    for line in text.splitlines():
        m = re.search(r"= (\w+)\[([\d,]+)\][^ ]* copy\(", line)
        if m:
            size = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1}.get(m.group(1), 8)
            n = int(np.prod([int(d) for d in m.group(2).split(",")])) * size
            if n >= 2 ** 20:
                big.append(f"{m.group(1)}[{m.group(2)}] {n / 2 ** 20:.0f} MiB")
    return big


def profile_prefill(t: int, chunk: int, small: bool) -> dict:
    """ms of the parts of one rtpurbo prefill chunk of one layer at position t (layer 1 of the pattern: 1
    retrieval group of 8), the cache filled with random values: the whole layer, the layer with attention replaced
    by zeros, the local KV heads' masked jnp attention and the same through the op (serving's prefill path), the
    full KV heads' plan + block-sparse op, the plan alone."""
    from benchmarks.kernels import bench
    from rtpurbo_jax import planner
    from rtpurbo_jax.attention import (AttentionCall, Positions, _local_kv_attention, _local_kv_attention_op,
                                      cached_attention, heads_attention)

    cfg = model_config(2, small)
    sparse = sparse_config(cfg, "rtpurbo", small)
    params = init_params(cfg, jax.random.key(0), jnp.bfloat16)
    lp = jax.tree.map(lambda a: a[1], params["layers"])
    cache = init_cache(cfg, 1, t + chunk, sparse, jnp.bfloat16)
    keys = iter(jax.random.split(jax.random.key(2), 16))
    lc = jax.tree.map(lambda a: jax.random.normal(next(keys), a.shape, a.dtype), cache.layers[1])
    ll, layout = cache.layout.layers[1], cache.layout
    ix = {"w_q": jnp.zeros((len(ll.retrieval_q), cfg.head_dim, layout.index_dim), jnp.float32)}
    ix["w_k"] = ix["w_q"]
    x = jax.random.normal(next(keys), (1, chunk, cfg.hidden_size), jnp.bfloat16)
    q_pos = t + jnp.arange(chunk, dtype=jnp.int32)[None]
    pos = Positions(q_pos, jnp.ones_like(q_pos, bool), jnp.asarray([t], jnp.int32), jnp.asarray([t + chunk], jnp.int32))
    call = AttentionCall(decode=False, tile=1, dense_retrieval=True, prefill_backend=None, decode_backend=None,
                         chunk=chunk)
    cos, sin = rope_cos_sin(q_pos, cfg.rope, cfg.head_dim)
    qkv = jax.jit(lambda x: project_qkv(lp, x, cfg, cos, sin))(x)
    sinks, window = jnp.int32(sparse.sinks), jnp.int32(sparse.window)
    qf, ql = ll.q_heads(ll.full_kv), ll.q_heads(ll.local_kv)
    is_r = np.isin(np.asarray(qf), ll.retrieval_q)
    kl = jnp.asarray(ll.local_kv, jnp.int32)
    fns = {
        "layer": lambda x, lc: decoder_layer(lp, x, cfg, cos, sin, lambda q: cached_attention(
            q, lc, ll, layout, cfg, sparse, ix, pos, call)[:2])[0],
        "layer_without_attention": lambda x, lc: decoder_layer(
            lp, x, cfg, cos, sin, lambda q: (jnp.zeros_like(q["q"]), None))[0],
        "local_heads": lambda x, lc: _local_kv_attention(qkv["q"][:, :, jnp.asarray(ql, jnp.int32)], qkv["k"][:, :, kl],
                                                          qkv["v"][:, :, kl], lc, layout, pos, sinks, window)[0],
        "local_heads_op": lambda x, lc: _local_kv_attention_op(
            qkv["q"][:, :, jnp.asarray(ql, jnp.int32)], qkv["k"][:, :, kl], qkv["v"][:, :, kl], lc, layout, pos, sinks,
            window, sparse.kv_block, call)[0],
        "full_heads_plan_and_op": lambda x, lc: heads_attention(qkv["q"][:, :, jnp.asarray(qf, jnp.int32)], lc.k_full,
                                                                lc.v_full, is_r, (), None, pos, sparse, cfg, call)[0],
        "full_heads_plan": lambda x, lc: planner.chunk_plan(is_r, (), None, q_pos[:, 0], chunk, t + chunk,
                                                            pos.new_len, sinks, window, q_block=128,
                                                            kv_block=sparse.kv_block).kv_blocks,
    }
    out = {"context": t, "chunk": chunk, "full_kv_heads": len(ll.full_kv), "local_kv_heads": len(ll.local_kv),
           "retrieval_q_heads": len(ll.retrieval_q)}
    for name, f in fns.items():
        out[name + "_ms"] = bench(jax.jit(f), x, lc, reps=5, rounds=3) * 1e3
    out["decode_step_copies"] = decode_copies(cfg, sparse, params, t)
    print(json.dumps(out), flush=True)
    return out


def device_kernels(trace_dir: str, steps: int) -> dict:
    """{kernel name: device µs per step} from a `jax.profiler.trace(..., create_perfetto_trace=True)` directory:
    the complete events of the processes whose name says GPU (every process on a CPU run), summed per name; and
    `launches`: those events per step."""
    import glob
    import gzip

    path = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True))[-1]
    data = json.load(gzip.open(path))
    events = data["traceEvents"] if isinstance(data, dict) else data
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {pid for pid, n in names.items() if "GPU" in n or "gpu" in n}
    per: dict = {}
    count = 0
    for e in events:
        if e.get("ph") == "X" and (e["pid"] in gpu if gpu else not e["name"].startswith("$")) and "dur" in e:
            per[e["name"]] = per.get(e["name"], 0.0) + float(e["dur"]) / steps
            count += 1
    return {"processes": sorted(set(names.values())), "gpu_found": bool(gpu), "launches": count / steps,
            "kernels": dict(sorted(per.items(), key=lambda kv: -kv[1]))}


def profile_decode(t: int, batches: list[int], small: bool, density: float, steps: int = 8) -> list[dict]:
    """Device time per kernel of `serving.decode_step` (the e2e model with 4 layers: retrieval groups 2, 1, 1, 1)
    at context t, the cache filled with random values, the indexer scaled to `density`; `steps` donated steps
    under the JAX profiler, next to their wall time; the same for the dense cuDNN decode."""
    cfg = model_config(4, small)
    sparse = sparse_config(cfg, "rtpurbo", small)
    params = init_params(cfg, jax.random.key(0), jnp.bfloat16)
    backend = "reference" if jax.default_backend() == "cpu" else None
    out = []
    for b in batches:
        keys = iter(jax.random.split(jax.random.key(b), 64))
        fill = lambda a: jax.random.normal(next(keys), a.shape, a.dtype)
        cache = init_cache(cfg, b, t + 256, sparse, jnp.bfloat16)
        cache = dataclasses.replace(cache, layers=jax.tree.map(fill, cache.layers),
                                    lengths=jnp.full((b,), t, jnp.int32))
        tok = jnp.arange(b, dtype=jnp.int32)
        ix, frac, cache = calibrate(params, cache, init_indexer(cfg, sparse.index_dim, jax.random.key(1)), tok, cfg,
                                    sparse, density, backend)
        modes = {"rtpurbo": (lambda c: decode_step(params, c, tok, ix, cfg=cfg, sparse=sparse, backend=backend,
                                                  check=False), cache)}
        dec = dense_decode_fn(cfg)
        dense = [(fill(jax.ShapeDtypeStruct((b, t + 256, cfg.num_kv_heads, cfg.head_dim), jnp.bfloat16)),
                  fill(jax.ShapeDtypeStruct((b, t + 256, cfg.num_kv_heads, cfg.head_dim), jnp.bfloat16)))
                 for _ in range(cfg.num_layers)]
        lengths = jnp.full((b,), t, jnp.int32)
        modes["dense_cudnn"] = (lambda c: dec(params, c, lengths, tok), dense)
        for name, (step, state) in modes.items():
            ms, state = timed_steps(step, state, steps)
            d = f"/tmp/e2e_trace_{name}_{t}_{b}"
            with jax.profiler.trace(d, create_perfetto_trace=True):
                for _ in range(steps):
                    lg, state = step(state)
                jax.block_until_ready((lg, state))
            found = device_kernels(d, steps)
            kernels = found.pop("kernels")
            row = {**found, "mode": name, "context": t, "batch": b, "layers_run": cfg.num_layers, "wall_ms_per_step": ms,
                   "device_us_per_step": sum(kernels.values()), "density": frac if name == "rtpurbo" else 1.0,
                   "kernels_us_per_step": {k: round(v, 2) for k, v in list(kernels.items())[:60]}}
            print(json.dumps(row), flush=True)
            out.append(row)
            state = None
        modes = dense = cache = None
    return out
