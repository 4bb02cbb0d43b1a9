"""`python -m benchmarks.serve`: serving prefill and decode through the hybrid cache, kernels vs the jnp path.

A Llama-3.1-8B-shaped model with random weights and `--layers` layers (32 q / 8 kv heads, d=128, bf16), 15%
retrieval heads (random, per layer), 4 sinks + 8192 window. For each prompt length it runs `serving.prefill`
(chunked) and `--decode-steps` of `serving.decode_step` twice: backend="reference" (jnp masked attention) and
backend=None (the device's kernels: block-sparse prefill — Mosaic GPU on Hopper — and sparse decode with the
fused selection kernels on the full KV heads). It checks that both give the same logits (relative error) and
reports prefill tokens/s and decode ms/step, compile excluded (a warm-up run first), and the compile seconds
(first run minus the timed one); `--generate-compile` also times `serving.generate`'s compilation for the
SmolLM2-135M shape (30 layers). JSON (+ PNG) to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.output import add_overwrite, claim, write_json
from rtpurbo_jax.kv_cache import init_cache
from rtpurbo_jax.model_config import LLAMA3_8B, SMOLLM2_135M
from rtpurbo_jax.params import init_params
from rtpurbo_jax.indexer import init_indexer
from rtpurbo_jax.serving import decode_step, generate, prefill
from rtpurbo_jax.sparse_config import SparseConfig


def run(params, indexer, cfg, sparse, prompt, steps, chunk, backend):
    """(last prefill logits fp32 [1, V], decode logits [steps, 1, V], prefill s, decode s/step)."""
    t = prompt.shape[1]
    max_len = -(-(t + steps) // 128) * 128

    def once():
        cache = init_cache(cfg, 1, max_len, sparse, jnp.bfloat16)
        jax.block_until_ready(cache)
        t0 = time.perf_counter()
        lg, cache = prefill(params, cache, prompt, jnp.asarray([t]), indexer, cfg=cfg, sparse=sparse, chunk=chunk,
                            backend=backend, check=False)
        lg.block_until_ready()
        t1 = time.perf_counter()
        outs = []
        for i in range(steps):  # teacher-forced tokens: both backends see the same inputs
            dl, cache = decode_step(params, cache, prompt[:, i], indexer, cfg=cfg, sparse=sparse, backend=backend,
                                    check=False)
            outs.append(dl)
        jax.block_until_ready(outs)
        return lg, jnp.stack(outs), t1 - t0, (time.perf_counter() - t1) / steps

    first = once()  # compiles
    out = once()
    return out + (first[2] - out[2], (first[3] - out[3]) * steps)


def generate_compile_s(cfg, prompt_len: int = 1024, new_tokens: int = 16, window: int = 2048) -> dict:
    """Seconds `serving.generate` takes to compile (first call minus a second, timed call) for `cfg` with random
    bf16 weights, 15% retrieval heads per layer (query granularity), the indexer at decode."""
    rng = np.random.default_rng(1)
    roles = (rng.random((cfg.num_layers, cfg.num_heads)) < 0.15).astype(int)
    sparse = SparseConfig(roles=roles.tolist(), window=window, seqlen_threshold=0)
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), init_params(cfg, jax.random.key(0), scale=0.02))
    indexer = init_indexer(cfg, sparse.index_dim, jax.random.key(1))
    prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, prompt_len)), jnp.int32)
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        out = generate(params, prompt, jnp.asarray([prompt_len]), cfg=cfg, sparse=sparse, indexer=indexer,
                       max_new_tokens=new_tokens)
        jax.block_until_ready(out["tokens"])
        times.append(time.perf_counter() - t0)
    return {"model": "SmolLM2-135M shape, random weights", "layers": cfg.num_layers, "prompt": prompt_len,
            "new_tokens": new_tokens, "first_call_s": times[0], "second_call_s": times[1],
            "compile_s": times[0] - times[1]}


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--prefill-mode", default="dense", choices=["dense", "indexer"])
    p.add_argument("--out", default="benchmarks/results/serve")
    p.add_argument("--small", action="store_true", help="tiny shapes for a CPU check of the script")
    p.add_argument("--generate-compile", action="store_true",
                   help="also time serving.generate's compilation for the SmolLM2-135M shape (30 layers)")
    add_overwrite(p)
    args = p.parse_args(argv)
    claim(p, [args.out + ".json"], args.overwrite)
    logging.basicConfig(level=logging.WARNING)
    for name in ("pallas_kernels", "rtpurbo_jax"):  # print which kernel each op resolved to
        logging.getLogger(name).setLevel(logging.INFO)
    cfg = dataclasses.replace(LLAMA3_8B, num_layers=args.layers)
    if args.small:
        cfg = dataclasses.replace(cfg, hidden_size=256, intermediate_size=512, num_heads=8, num_kv_heads=2,
                                  head_dim=32, vocab_size=512)
    rng = np.random.default_rng(0)
    n = cfg.num_heads
    roles = np.zeros((cfg.num_layers, n), int)
    for layer in roles:
        layer[rng.choice(n, max(1, round(0.15 * n)), replace=False)] = 1
    window = 256 if args.small else 8192
    sparse = SparseConfig(roles=roles.tolist(), sinks=4, window=window, seqlen_threshold=0,
                          prefill_mode=args.prefill_mode, top_p=0.9)
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), init_params(cfg, jax.random.key(0), scale=0.02))
    indexer = init_indexer(cfg, sparse.index_dim, jax.random.key(1))
    res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
           "date": datetime.date.today().isoformat(), "layers": cfg.num_layers, "heads": [n, cfg.num_kv_heads],
           "head_dim": cfg.head_dim, "retrieval_heads_per_layer": int(roles[0].sum()), "window": window,
           "chunk": args.chunk, "prefill_mode": args.prefill_mode, "rows": []}
    if args.generate_compile:
        small = dataclasses.replace(SMOLLM2_135M, num_layers=4) if args.small else SMOLLM2_135M
        res["generate_compile"] = generate_compile_s(small, prompt_len=256 if args.small else 1024)
        print(json.dumps(res["generate_compile"]), flush=True)
    for t in args.lengths:
        prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, t)), jnp.int32)
        got = {}
        for name, backend in (("jnp reference", "reference"), ("kernels", None)):
            got[name] = run(params, indexer, cfg, sparse, prompt, args.decode_steps, args.chunk, backend)
        ref, ker = got["jnp reference"], got["kernels"]
        row = {"length": t, "prefill_s": {k: v[2] for k, v in got.items()},
               "prefill_compile_s": {k: v[4] for k, v in got.items()},
               "decode_compile_s": {k: v[5] for k, v in got.items()},
               "prefill_tokens_per_s": {k: t / v[2] for k, v in got.items()},
               "decode_ms_per_step": {k: v[3] * 1e3 for k, v in got.items()},
               "prefill_speedup": ref[2] / ker[2], "decode_speedup": ref[3] / ker[3],
               "rel_err_prefill_logits": rel(ker[0], ref[0]), "rel_err_decode_logits": rel(ker[1], ref[1])}
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
    write_json(args.out + ".json", res)
    plot(res, args.out + ".png")
    print(f"wrote {args.out}.json / .png")


def plot(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    lengths = [r["length"] for r in res["rows"]]
    x = np.arange(len(lengths))
    for ax, key, label in ((axes[0], "prefill_tokens_per_s", "prefill tokens/s"),
                           (axes[1], "decode_ms_per_step", "decode ms / step")):
        for i, name in enumerate(("jnp reference", "kernels")):
            ax.bar(x + 0.4 * i, [r[key][name] for r in res["rows"]], 0.4, label=name)
        ax.set_xticks(x + 0.2, [f"{L // 1024}K" for L in lengths])
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(f"serving, {res['layers']} layers of Llama-3.1-8B shape, {res['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
