"""Does a scan over layers copy each layer's cache slice before a Pallas kernel reads it? (#15 design probe)

Times one decode layer-loop of the sparse decode kernel over L layers' caches two ways on the GPU: unrolled over
per-layer buffers (today's serving) and `lax.scan` over a stacked [L, B, S, K, H] cache, the cache carried and
one token written per layer (as serving does); counts the copies in the optimised HLO. Also compiles
`serving.generate` for a SmolLM2-shaped model (random weights, the roles of a converted checkpoint) and reports
lower / compile seconds (`serving.compile_generate`: both programs compiled at once) and the call's time per
variant (layers unrolled; scanned by head split; scanned with padded retrieval slots; all in one stack); `--switch-probe` times
a `lax.switch` per layer by itself. Writes JSON to --out.

    python -m benchmarks.scan_probe --roles converted/mymodel/rtpurbo.json --out DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.output import add_overwrite, claim, write_json
from pallas_kernels.sparse_decode.api import sparse_decode_attention
from pallas_kernels.sparse_decode.plan import decode_plan


def _time(f, *args, reps=20):
    jax.block_until_ready(f(*args))
    t0 = time.perf_counter()
    for _ in range(reps):
        out = f(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / reps * 1e3


def copy_probe(layers=8, b=1, s=131072, kh=8, g=4, h=128, density=0.1, backend="triton"):
    rng = np.random.default_rng(0)
    n, sb = kh * g, s // 64
    sel = jnp.asarray(rng.random((b, n, sb)) < density)
    plan = decode_plan(sel, kh, sinks=0, window=1 << 30, kv_len=jnp.full((b,), s, jnp.int32), kv_block=64)
    key = jax.random.key(0)
    q = jax.random.normal(key, (b, n, h), jnp.bfloat16)
    stacked = jax.random.normal(key, (layers, b, s, kh, h), jnp.bfloat16)
    tup = tuple(stacked[i] for i in range(layers))
    new = jax.random.normal(key, (b, 1, kh, h), jnp.bfloat16)

    def unrolled(q, tup):
        caches = []
        for k in tup:
            k = jax.lax.dynamic_update_slice(k, new, (0, s - 1, 0, 0))
            q, _ = sparse_decode_attention(q, k, k, plan, backend=backend)
            caches.append(k)
        return q, tuple(caches)

    def scanned(q, stacked):
        def body(q, k):
            k = jax.lax.dynamic_update_slice(k, new, (0, s - 1, 0, 0))
            o, _ = sparse_decode_attention(q, k, k, plan, backend=backend)
            return o, k
        return jax.lax.scan(body, q, stacked)

    def scanned_carry(q, stacked):
        def body(carry, i):
            q, cache = carry
            cache = jax.lax.dynamic_update_slice(cache, new[None], (i, 0, s - 1, 0, 0))
            k = jax.lax.dynamic_index_in_dim(cache, i, 0, keepdims=False)
            o, _ = sparse_decode_attention(q, k, k, plan, backend=backend)
            return (o, cache), None
        (q, cache), _ = jax.lax.scan(body, (q, stacked), jnp.arange(layers))
        return q, cache

    rows = {}
    for name, f, arg in (("unrolled", unrolled, tup), ("scan_xs", scanned, stacked), ("scan_carry", scanned_carry, stacked)):
        jf = jax.jit(f, donate_argnums=(1,))
        hlo = jf.lower(q, arg).compile().as_text()
        big = b * s * kh * h  # elements of one layer's K: a copy this large is a cache slice materialised
        copies = sum(int(np.prod([int(d) for d in dims.split(",") if d])) >= big
                     for dims in re.findall(r"= \w+\[([\d,]*)\]\S* copy(?:-start)?\(", hlo))
        dyn = len(re.findall(r"dynamic-slice\(", hlo))
        fresh = jax.tree.map(jnp.copy, arg)
        t0 = time.perf_counter()
        jax.block_until_ready(jf(q, fresh))
        first = time.perf_counter() - t0
        fresh = jax.tree.map(jnp.copy, arg)

        def run(q, a=[fresh]):
            out = jf(q, a[0])
            a[0] = out[1]
            return out[0]

        rows[name] = {"ms_per_layer_loop": _time(run, q), "first_call_s": first, "hlo_copy_ops": copies,
                      "hlo_dynamic_slices": dyn}
        print(name, rows[name], flush=True)
    kv_bytes = layers * b * s * kh * h * 2
    return {"layers": layers, "batch": b, "keys": s, "kv_heads": kh, "group": g, "head_dim": h, "density": density,
            "backend": backend, "k_bytes_all_layers": kv_bytes, "rows": rows}


def switch_probe(layers: int = 30, groups: int = 4, d: int = 576, reps: int = 50) -> dict:
    """What a `lax.switch` per layer costs by itself: a scan over `layers` tiny layers (a [1, d] x [d, d] matmul)
    whose weights are picked per layer by a switch over `groups` branches, against the same scan picking them
    by a dynamic index (no conditional). On GPUs each conditional reads its branch index on the host."""
    key = jax.random.key(0)
    w = jax.random.normal(key, (groups, d, d), jnp.float32) * d ** -0.5
    x = jax.random.normal(key, (1, d), jnp.float32)
    gis = jnp.asarray(np.arange(layers) % groups, jnp.int32)

    def body_switch(x, gi):
        return jax.lax.switch(gi, [lambda x, g=g: jnp.tanh(x @ w[g]) for g in range(groups)], x), None

    def body_index(x, gi):
        return jnp.tanh(x @ jnp.take(w, gi, axis=0)), None

    out = {"layers": layers, "groups": groups, "d": d}
    for name, body in (("switch", body_switch), ("index", body_index)):
        f = jax.jit(lambda x, body=body: jax.lax.scan(body, x, gis)[0])
        out[f"{name}_us_per_layer"] = _time(f, x, reps=reps) * 1e3 / layers
    out["switch_cost_us_per_layer"] = out["switch_us_per_layer"] - out["index_us_per_layer"]
    print("switch probe", out, flush=True)
    return out


OPTION_SETS = {"default": {}, "autotune_0": {"xla_gpu_autotune_level": 0},
               "llvm_cheap": {"xla_llvm_disable_expensive_passes": True},
               "both": {"xla_gpu_autotune_level": 0, "xla_llvm_disable_expensive_passes": True},
               "no_triton_gemm": {"xla_gpu_enable_triton_gemm": False}}


VARIANTS = {"full": False, "rtpurbo": False, "full_scan": "split", "rtpurbo_scan": "split",
            "rtpurbo_scan_padded": "padded", "rtpurbo_scan_uniform": "uniform"}  # name -> generate's scan_layers


def compile_probe(roles_path, option_sets=("default",), variants=VARIANTS, backend=None, prompt_len=2048,
                  concurrent=True, profile=False):
    from rtpurbo_jax import serving
    from rtpurbo_jax.indexer import init_indexer
    from rtpurbo_jax.kv_cache import CacheLayout
    from rtpurbo_jax.model_config import SMOLLM2_135M as cfg
    from rtpurbo_jax.params import init_params
    from rtpurbo_jax.sparse_config import SparseConfig

    with open(roles_path) as f:
        meta = json.load(f)
    sp = dataclasses.replace(SparseConfig.from_dict(meta["sparse_config"]), seqlen_threshold=0)
    p = jax.tree.map(lambda x: x.astype(jnp.bfloat16), init_params(cfg, jax.random.key(0), scale=0.02))
    ix = init_indexer(cfg, sp.index_dim, jax.random.key(1))
    prompt = jax.random.randint(jax.random.key(2), (1, prompt_len), 0, cfg.vocab_size)
    out = {}
    args = (p, prompt, jnp.asarray([prompt_len]), ix, jax.random.key(0))
    for opts in option_sets:
        for name in [v for v in VARIANTS if v in variants]:
            sparse, scan_layers = (None if name.startswith("full") else sp), VARIANTS[name]
            exe = serving.compile_generate(*args, cfg=cfg, sparse=sparse, sampling=serving.SamplingConfig(),
                                           max_new_tokens=16, stop_tokens=(), chunk=512, max_len=prompt_len + 16,
                                           cache_dtype="bfloat16", backend=(backend, backend), interpret=False,
                                           scan_layers=scan_layers, compiler_options=OPTION_SETS[opts] or None,
                                           concurrent=concurrent, count_ops=True)
            row = {"lower_s": exe.lower_s, "compile_s": exe.compile_s, "concurrent_compile": concurrent,
                   "scan_layers": scan_layers,
                   "stablehlo_ops": exe.stablehlo_ops,
                   "layer_bodies": len(CacheLayout.build(cfg, sparse, prompt_len + 16, scan_layers).groups)
                   if scan_layers else cfg.num_layers}

            def call():  # the whole generate call: the prompt's prefill + 16 decode steps (two programs)
                first, done, key, cache = exe.prefill(*args)
                return exe.decode(p, cache, first, done, key, ix)

            row["tokens"] = np.asarray(jax.block_until_ready(call())[0]).tolist()  # [B, 17]: compare variants
            runs = []
            for _ in range(3):
                t0 = time.perf_counter()
                jax.block_until_ready(call())
                runs.append(time.perf_counter() - t0)
            row["generate_ms_median"] = float(np.median(runs)) * 1e3
            runs = []
            # the decode program alone: 15 steps after the prefill's first token; it takes (donates) the cache, so
            # each run decodes from a fresh prefill
            for _ in range(3):
                first, done, key, cache = jax.block_until_ready(exe.prefill(*args))
                t0 = time.perf_counter()
                jax.block_until_ready(exe.decode(p, cache, first, done, key, ix))
                runs.append(time.perf_counter() - t0)
            row["decode_tokens_per_s"] = 15 / float(np.median(runs))
            if profile:
                row["profile"] = _profile(call)
            key = name if opts == "default" else f"{name}/{opts}"
            out[key] = {"compiler_options": OPTION_SETS[opts], **row}
            print("generate", key, out[key], flush=True)
    return {"model": "SmolLM2-135M shape, random weights, roles of " + os.path.basename(os.path.dirname(roles_path)),
            "retrieval_heads": int(np.asarray(sp.roles_array).sum()), "window": sp.window,
            "backend": backend or "default (the device's kernels)", "prompt_len": prompt_len, "generate": out}


def _profile(call) -> dict:
    """One traced call: its wall ms, the device time and kernel launches in it (`e2e_profile.device_kernels`)
    and the 30 kernel names with the most device time. Wall minus device time is what the host adds (launch
    gaps, conditionals reading their index, loop conditions)."""
    import tempfile

    from benchmarks.e2e_profile import device_kernels

    d = tempfile.mkdtemp(prefix="scan_probe_trace_")
    with jax.profiler.trace(d, create_perfetto_trace=True):
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        wall = time.perf_counter() - t0
    found = device_kernels(d, 1)
    kernels = found.pop("kernels")
    return {**found, "wall_ms": wall * 1e3, "device_ms": sum(kernels.values()) / 1e3,
            "top_kernels_us": {k: round(v, 1) for k, v in list(kernels.items())[:30]}}


def plot(res: dict, path: str) -> None:
    """Bar chart of the copy probe's decode-loop times (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cp = res["copy_probe"]
    rows = cp["rows"]
    fig, ax = plt.subplots(figsize=(5, 3))
    ms = [rows[n]["ms_per_layer_loop"] for n in rows]
    ax.bar(list(rows), ms, color=["tab:green", "tab:orange", "tab:red"][: len(rows)])
    for i, v in enumerate(ms):
        ax.text(i, v, f"{v:.2f}", ha="center", va="bottom")
    ax.set_ylabel(f"ms per {cp['layers']}-layer decode loop")
    ax.set_title(f"{cp['keys'] // 1024}K keys, {cp['density']:.0%} of blocks, {cp['backend']} sparse decode, "
                 f"{res['device']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scan_probe")
    ap.add_argument("--roles", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--options", nargs="+", default=["default"], choices=sorted(OPTION_SETS),
                    help="XLA compiler option sets to compile generate with (compile time and run time each)")
    ap.add_argument("--no-copy-probe", action="store_true")
    ap.add_argument("--switch-probe", action="store_true", help="also time a lax.switch per layer by itself")
    ap.add_argument("--serial-compile", action="store_true",
                    help="compile generate's two programs one after the other instead of at once")
    ap.add_argument("--profile", action="store_true",
                    help="also trace one generate call per variant: device time, kernel launches, top kernels")
    ap.add_argument("--prompt-len", type=int, default=2048, help="prompt tokens of the compiled generate (+16 new)")
    ap.add_argument("--backend", default=None, choices=["reference", "triton"],
                    help="attention backend of the compiled generate (default: the device's kernels)")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS),
                    help="generate variants compiled and timed (layers unrolled / scanned, full / RTPurbo)")
    add_overwrite(ap)
    a = ap.parse_args(argv)
    claim(ap, [os.path.join(a.out, "scan_probe.json")], a.overwrite)
    res = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
           "date": datetime.date.today().isoformat()}
    if not a.no_copy_probe:
        res["copy_probe"] = copy_probe()
    if a.switch_probe:
        res["switch_probe"] = switch_probe()
    if a.variants:
        res["compile_probe"] = compile_probe(a.roles, a.options, a.variants, a.backend, a.prompt_len,
                                             not a.serial_compile, a.profile)
    res["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    write_json(os.path.join(a.out, "scan_probe.json"), res)
    if "copy_probe" in res:
        plot(res, os.path.join(a.out, "scan_probe.png"))


if __name__ == "__main__":
    main()
