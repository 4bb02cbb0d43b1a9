"""Block-sparse attention microbenchmarks on the GPU against cuDNN, in one run.

    python -m benchmarks.kernels [--lengths 8192 32768 131072] [--out benchmarks/results/kernels_h100]

Shapes: B=1, 32 query / 8 KV heads, head_dim 128, bf16 (Llama-3.1-8B attention). For every variant the
output is first checked against a reference (cuDNN for dense plans, the jnp reference on a head subset for
sparse ones), then timed with `reps` calls enqueued back to back and one block_until_ready (median of 3).
TFLOP/s count visited blocks only: 4 · B · bq · bk · H per (head, query tile, visited block) — masked-out
elements of edge blocks are counted as done, as the kernel does compute them. Ratios are against cuDNN causal
dense attention on the same shapes in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_plan import FULL_WINDOW, band_selection, cdiv, plan_from_selection
from pallas_kernels.sparse_attention.api import block_sparse_attention
from pallas_kernels.sparse_attention.reference import block_sparse_attention as reference_bsa
from pallas_kernels.sparse_attention.triton import block_sparse_attention_triton

B, N, K, H = 1, 32, 8, 128


def bench(fn, *args, reps: int = 10) -> float:
    """Median seconds per call over 3 rounds of `reps` calls enqueued back to back."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        outs = [fn(*args) for _ in range(reps)]
        jax.block_until_ready(outs)
        times.append((time.perf_counter() - t0) / reps)
    return float(np.median(times))


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def make_plan(kind: str, t: int, *, qb=128, kb=64, density=1.0, retrieval=None, window=8192, sinks=4, seed=0):
    """Plans: dense causal, random block-sparse at a density (diagonal kept), or the paper's layer mix
    (retrieval heads dense or at `density`, the rest sinks + window)."""
    tb, sb = cdiv(t, qb), cdiv(t, kb)
    causal = band_selection(1, t, t, sinks=0, window=FULL_WINDOW, q_block=qb, kv_block=kb)[0]
    rng = np.random.default_rng(seed)
    sink_w = np.zeros(N, np.int32)
    win = np.full(N, FULL_WINDOW, np.int64)
    if kind == "dense":
        sel = np.broadcast_to(causal, (N, tb, sb))
    elif kind == "random":
        diag = band_selection(1, t, t, sinks=0, window=qb, q_block=qb, kv_block=kb)[0]
        sel = causal[None] & ((rng.random((N, tb, sb)) < density) | diag[None])
    elif kind == "mix":
        local = band_selection(1, t, t, sinks=sinks, window=window, q_block=qb, kv_block=kb)[0]
        ret = np.zeros(N, bool)
        ret[rng.choice(N, retrieval, replace=False)] = True
        if density < 1.0:
            diag = band_selection(1, t, t, sinks=sinks, window=qb, q_block=qb, kv_block=kb)[0]
            rsel = causal[None] & ((rng.random((N, tb, sb)) < density) | diag[None])
        else:
            rsel = np.broadcast_to(causal, (N, tb, sb))
        sel = np.where(ret[:, None, None], rsel, local[None])
        sink_w = np.where(ret, 0, sinks).astype(np.int32)
        win = np.where(ret, FULL_WINDOW, window)
    else:
        raise ValueError(kind)
    m = int(sel.sum(-1).max())
    plan = plan_from_selection(jnp.asarray(sel[None]), sinks=sink_w, window=win.astype(np.int32), kv_len=t,
                               q_block=qb, kv_block=kb, max_blocks=m)
    visited = int(sel.sum())
    return plan, visited


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__)
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--out", default="benchmarks/results/kernels")
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args(argv)
    dev = jax.devices()[0]
    res = {"device": dev.device_kind, "jax": jax.__version__, "date": datetime.date.today().isoformat(),
           "shape": {"B": B, "N": N, "K": K, "H": H, "dtype": "bfloat16"}, "rows": []}

    def record(**row):
        res["rows"].append(row)
        print(json.dumps(row), flush=True)

    for t in args.lengths:
        kq, kk, kv = jax.random.split(jax.random.key(t), 3)
        q = jax.random.normal(kq, (B, t, N, H), jnp.bfloat16)
        k = jax.random.normal(kk, (B, t, K, H), jnp.bfloat16)
        v = jax.random.normal(kv, (B, t, K, H), jnp.bfloat16)
        dense_flops = 4 * B * N * H * t * (t + 1) / 2
        cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"))
        ref_dense = cudnn(q, k, v)
        t_cudnn = bench(cudnn, q, k, v, reps=args.reps)
        record(length=t, variant="cudnn_dense", ms=t_cudnn * 1e3, tflops=dense_flops / t_cudnn / 1e12, speedup=1.0)
        win = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn",
                                                                  local_window_size=(8191, 0)))
        t_win = bench(win, q, k, v, reps=args.reps)
        record(length=t, variant="cudnn_window8192_all_heads", ms=t_win * 1e3, speedup=t_cudnn / t_win)

        variants = [("dense_plan", dict(kind="dense"))]
        variants += [(f"random_{int(d * 100)}pct", dict(kind="random", density=d)) for d in (0.5, 0.1, 0.05, 0.02)]
        n_ret = max(1, round(0.15 * N))  # 5 of 32 query heads
        variants += [("paper_mix_dense_retrieval", dict(kind="mix", retrieval=n_ret)),
                     ("paper_mix_retrieval_5pct", dict(kind="mix", retrieval=n_ret, density=0.05))]
        causal_blocks = N * int(band_selection(1, t, t, sinks=0, window=FULL_WINDOW, q_block=128, kv_block=64)[0].sum())
        for name, kw in variants:
            plan, visited = make_plan(t=t, **kw)
            flops = 4 * B * 128 * 64 * H * visited
            sweep = name == "dense_plan" and t == args.lengths[0]
            for nw, ns in ([(4, 2), (8, 2), (4, 3), (8, 3)] if sweep else [(8, 2)]):
                fn = jax.jit(lambda q, k, v, plan, nw=nw, ns=ns: block_sparse_attention_triton(
                    q, k, v, plan, num_warps=nw, num_stages=ns)[0])
                out = fn(q, k, v, plan)
                if name == "dense_plan":
                    err = rel_err(out, ref_dense)
                else:  # the jnp reference at the first (smallest) length only: memory O(N · chunk · S)
                    err = rel_err(out, reference_bsa(q, k, v, plan, chunk=256)) if t == args.lengths[0] else None
                if err is not None and not err < 2e-2:
                    raise SystemExit(f"{name} at {t}: relative error {err} vs reference: not timing a wrong kernel")
                sec = bench(fn, q, k, v, plan, reps=args.reps)
                record(length=t, variant=name, num_warps=nw, num_stages=ns, density=visited / causal_blocks,
                       visited_blocks=visited, ms=sec * 1e3, tflops_visited=flops / sec / 1e12,
                       speedup=t_cudnn / sec, rel_err=err)
        decode_rows(t, k, v, record, args.reps)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(res, f, indent=1)
    plot(res, args.out + ".png")
    print(f"wrote {args.out}.json / .png")


def decode_rows(t, k, v, record, reps):
    """Context for decode: cuDNN one-token attention over t keys, and the exact XLA indexer top-p selection
    (5 retrieval heads, index_dim 16, 64-token blocks) for one token — the selection's cost at this length."""
    from pallas_kernels.indexer_topp.reference import topp_selection

    q1 = jax.random.normal(jax.random.key(1), (B, 1, N, H), jnp.bfloat16)
    dec = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"))
    t_dec = bench(dec, q1, k, v, reps=reps * 5)
    record(length=t, variant="cudnn_decode_b1", us=t_dec * 1e6, gbps=2 * t * K * H * 2 / t_dec / 1e9)
    qi = jax.random.normal(jax.random.key(2), (B, 1, 5, 16), jnp.float32)
    ki = jax.random.normal(jax.random.key(3), (B, t, 5, 16), jnp.float32)
    sel = jax.jit(lambda qi, ki: topp_selection(qi, ki, jnp.asarray([t]), top_p=0.9, q_block=1, kv_block=64,
                                               q_offset=t - 1, sinks=4))
    t_sel = bench(sel, qi, ki, reps=reps * 5)
    record(length=t, variant="xla_indexer_topp_decode_5heads", us=t_sel * 1e6, share_of_cudnn_decode=t_sel / t_dec)


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["rows"] if "speedup" in r and r.get("num_warps") in (None, 8)
            and r.get("num_stages") in (None, 2)]
    lengths = sorted({r["length"] for r in rows})
    names = list(dict.fromkeys(r["variant"] for r in rows))
    fig, ax = plt.subplots(figsize=(9, 4))
    w = 0.8 / len(names)
    for i, n in enumerate(names):
        ys = [next((r["speedup"] for r in rows if r["variant"] == n and r["length"] == L), 0) for L in lengths]
        ax.bar(np.arange(len(lengths)) + i * w, ys, w, label=n)
    ax.set_xticks(np.arange(len(lengths)) + 0.4 - w / 2, [f"{L // 1024}K" for L in lengths])
    ax.set_yscale("log")
    ax.set_ylabel("speed-up vs cuDNN dense causal")
    ax.set_title(f"one attention layer, B=1, 32q/8kv heads, d=128, bf16 ({res['device']}, jax {res['jax']})",
                 fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
