"""Block-sparse prefill attention microbenchmarks against the platform's dense baseline, in one run.

    python -m benchmarks.kernels [--lengths 8192 32768 131072 524288 1048576] [--out benchmarks/results/kernels_h100]

Shapes: B=1, 32 query / 8 KV heads, head_dim 128, bf16 (Llama-3.1-8B attention). Plans are built on the device in
closed form (`benchmarks.prefill_plans`). Backends: mosaic_gpu (the Hopper path; 128-key blocks unless a row says
kb64) and triton (portable; up to --triton-max-length). Every variant is first checked (dense plans against cuDNN
at every length; sparse plans against the jnp reference up to 32K), then timed with calls enqueued back
to back and one block_until_ready (median of `rounds`). TFLOP/s count visited blocks: 4 · bq · bk · H per (head,
query tile, visited block) — masked elements of edge blocks count as done, the kernel computes them. Speed-ups are
against cuDNN causal dense attention on the same shapes in the same run. Local heads are also compared with
cuDNN's sliding window (8192, no sinks: a lower bound for a window + sink pass merged by log-sum-exp). On GPUs the
FA2-class baseline the paper quotes (the Pallas Triton flash kernel, `baselines.fa2_attention`, GQA's K / V
repeated per query head outside the timing) is timed too: row `fa2_pallas_triton_dense`, and every plan row gets
`speedup_vs_fa2`; the paper-mix rows also carry the paper's figure at that length (`paper_speedup_vs_fa2`, 32K
-> 1M). `--no-fa2` skips it.
On a TPU the same command runs the same plans on mosaic_tpu against splash attention (`benchmarks.baselines`;
rows named splash_*); not yet run on a TPU.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import baselines
from benchmarks.output import add_overwrite, claim, write_json
from benchmarks.prefill_plans import causal_block_count, layer_plan
from pallas_kernels.sparse_attention.reference import block_sparse_attention as reference_bsa

B, N, K, H = 1, 32, 8, 128
N_RETRIEVAL = max(1, round(0.15 * N))  # 5 of 32 query heads: the paper's ~15%


def bench(fn, *args, reps: int = 10, rounds: int = 3) -> float:
    """Median seconds per call over `rounds` rounds of `reps` calls enqueued back to back."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        outs = [fn(*args) for _ in range(reps)]
        jax.block_until_ready(outs)
        times.append((time.perf_counter() - t0) / reps)
        del outs
    return float(np.median(times))


@jax.jit
def _sq_norms(a, b):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)  # fused into the reductions: no fp32 copies at 1M
    return jnp.sum((a - b) ** 2), jnp.sum(b ** 2)


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| on the device."""
    num, den = _sq_norms(a, b)
    return float(jnp.sqrt(num / den))


def kernel_fn(backend: str, **kw):
    if backend == "mosaic_gpu":
        from pallas_kernels.sparse_attention.mosaic_gpu import block_sparse_attention_mosaic_gpu as f
    elif backend == "triton":
        from pallas_kernels.sparse_attention.triton import block_sparse_attention_triton as f
    else:  # mosaic_tpu (and reference) through the op's API, which lays q / k / v out head-major
        from pallas_kernels.sparse_attention.api import block_sparse_attention

        return jax.jit(lambda q, k, v, plan: block_sparse_attention(q, k, v, plan, backend=backend, **kw))
    return jax.jit(lambda q, k, v, plan: f(q, k, v, plan, **kw)[0])


def platform_variants(t: int, triton_max: int, platform: str):
    """The variant rows for the device: GPU rows as `variants`; on TPUs the same plans on mosaic_tpu (128-key
    blocks); elsewhere (a CPU check of the script) on the jnp reference."""
    rows = variants(t, triton_max)
    if platform in ("gpu", "cuda"):
        return rows
    backend = "mosaic_tpu" if platform == "tpu" else "reference"
    return [(name, backend, kb, kw) for name, b, kb, kw in rows if b == "mosaic_gpu" and kb == 128]


def variants(t: int, triton_max: int):
    """(name, backend, kv_block, plan kwargs)."""
    rows = [("dense_plan", "mosaic_gpu", 128, dict(kind="dense"))]
    if t <= 131072:
        rows.append(("dense_plan", "mosaic_gpu", 64, dict(kind="dense")))
    rows += [(f"random_{int(d * 100)}pct", "mosaic_gpu", 128, dict(kind="random", density=d))
             for d in (0.5, 0.1, 0.05, 0.02)]
    if t <= 131072:
        rows.append(("random_10pct", "mosaic_gpu", 64, dict(kind="random", density=0.1)))
    rows += [("local_sink4_window8192_all_heads", "mosaic_gpu", 128, dict(kind="local")),
             ("paper_mix_dense_retrieval", "mosaic_gpu", 128, dict(kind="mix", retrieval=N_RETRIEVAL)),
             ("paper_mix_retrieval_10pct", "mosaic_gpu", 128, dict(kind="mix", retrieval=N_RETRIEVAL, density=0.1)),
             ("paper_mix_retrieval_5pct", "mosaic_gpu", 128, dict(kind="mix", retrieval=N_RETRIEVAL, density=0.05))]
    if t <= triton_max:
        rows += [("dense_plan", "triton", 64, dict(kind="dense")),
                 ("paper_mix_dense_retrieval", "triton", 64, dict(kind="mix", retrieval=N_RETRIEVAL))]
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--out", default="benchmarks/results/kernels")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--triton-max-length", type=int, default=131072)
    p.add_argument("--reference-max-length", type=int, default=32768,
                   help="check sparse plans against the jnp reference up to this length")
    p.add_argument("--no-decode", action="store_true", help="skip the decode context rows")
    p.add_argument("--no-fa2", action="store_true", help="skip the FA2-class baseline (Pallas Triton flash; GPUs)")
    p.add_argument("--only", nargs="*", default=None, metavar="VARIANT",
                   help="run only these variants (names as in the JSON, e.g. dense_plan)")
    add_overwrite(p)
    args = p.parse_args(argv)
    claim(p, [args.out + ".json"], args.overwrite)
    dev = jax.devices()[0]
    base = baselines.name()
    res = {"device": dev.device_kind, "jax": jax.__version__, "date": datetime.date.today().isoformat(),
           "shape": {"B": B, "N": N, "K": K, "H": H, "dtype": "bfloat16"}, "baseline": base, "rows": []}

    def record(**row):
        res["rows"].append(row)
        print(json.dumps(row), flush=True)

    for t in args.lengths:
        reps, rounds = (args.reps, 3) if t <= 131072 else (1, 2)
        kq, kk, kv = jax.random.split(jax.random.key(t), 3)
        q = jax.random.normal(kq, (B, t, N, H), jnp.bfloat16)
        k = jax.random.normal(kk, (B, t, K, H), jnp.bfloat16)
        v = jax.random.normal(kv, (B, t, K, H), jnp.bfloat16)
        dense_flops = 4 * B * N * H * t * (t + 1) / 2
        cudnn = jax.jit(lambda q, k, v: baselines.dense_attention(q, k, v))  # the platform's baseline
        ref_dense = cudnn(q, k, v)
        t_cudnn = bench(cudnn, q, k, v, reps=reps, rounds=rounds)
        record(length=t, variant=f"{base}_dense", ms=t_cudnn * 1e3, tflops=dense_flops / t_cudnn / 1e12, speedup=1.0)
        win = jax.jit(lambda q, k, v: baselines.dense_attention(q, k, v, window=8192))
        t_win = bench(win, q, k, v, reps=reps, rounds=rounds)
        record(length=t, variant=f"{base}_window8192_all_heads", ms=t_win * 1e3, speedup=t_cudnn / t_win)
        tokamax_row(q, k, v, ref_dense, t_cudnn, dense_flops, t, reps, rounds, record)
        t_fa2 = (None if args.no_fa2 or jax.default_backend() not in ("gpu", "cuda")
                 else fa2_row(q, k, v, ref_dense, t_cudnn, dense_flops, t, reps, rounds, record))
        for name, backend, kb, kw in platform_variants(t, args.triton_max_length, jax.default_backend()):
            if args.only is not None and name not in args.only:
                continue
            plan, visited = layer_plan(t=t, num_heads=N, kb=kb, **kw)
            causal_blocks = causal_block_count(t, 128, kb)
            fn = kernel_fn(backend)
            out = fn(q, k, v, plan)
            if kw["kind"] == "dense":
                err = rel_err(out, ref_dense)
            else:  # the jnp reference up to --reference-max-length only: memory O(N · chunk · S)
                err = (rel_err(out, reference_bsa(q, k, v, plan, chunk=256))
                       if t <= args.reference_max_length else None)
            del out
            if err is not None and not err < 2e-2:
                raise SystemExit(f"{name}/{backend} at {t}: relative error {err} vs reference: not timing it")
            sec = bench(fn, q, k, v, plan, reps=reps, rounds=rounds)
            flops = 4 * B * 128 * kb * H * visited
            record(length=t, variant=name, backend=backend, kv_block=kb, density=visited / (N * causal_blocks),
                   visited_blocks=visited, ms=sec * 1e3, tflops_visited=flops / sec / 1e12,
                   speedup=t_cudnn / sec, rel_err=err, **fa2_fields(name, t, t_fa2, sec))
            del plan
            gc.collect()
        if not args.no_decode and t <= 131072:
            decode_rows(t, k, v, record, args.reps)
        del q, k, v, ref_dense
        gc.collect()
        write_json(args.out + ".json", res)  # after every length: a crash at 1M keeps the shorter lengths
    plot(res, args.out + ".png")
    print(f"wrote {args.out}.json / .png")


def tokamax_row(q, k, v, ref_dense, t_cudnn, dense_flops, t, reps, rounds, record) -> None:
    """tokamax's Mosaic GPU flash attention (dense causal) as a same-run baseline, when tokamax is importable
    (it is not a dependency: carry its wheels to the GPU machine)."""
    try:
        import tokamax
    except ImportError:
        return
    fn = jax.jit(lambda q, k, v: tokamax.dot_product_attention(q, k, v, is_causal=True, implementation="mosaic"))
    baseline_row("tokamax_mosaic_dense", "tokamax", fn, (q, k, v), ref_dense, t_cudnn, dense_flops, t, reps, rounds,
                 record)


def fa2_row(q, k, v, ref_dense, t_cudnn, dense_flops, t, reps, rounds, record) -> float:
    """The FA2-class baseline (`baselines.fa2_attention`) on the same causal problem, checked against cuDNN first;
    its seconds per call. K / V are repeated to the query heads once, before the timing."""
    kr, vr = baselines.repeat_kv(k, N), baselines.repeat_kv(v, N)
    fn = jax.jit(lambda q, k, v: baselines.fa2_attention(q, k, v))
    return baseline_row("fa2_pallas_triton_dense", "fa2 baseline", fn, (q, kr, vr), ref_dense, t_cudnn, dense_flops,
                        t, reps, rounds, record)


def baseline_row(variant, what, fn, args, ref_dense, t_cudnn, dense_flops, t, reps, rounds, record) -> float:
    """A second dense causal baseline beside cuDNN: fn(*args) checked against cuDNN's result (refused past 2%
    relative error), timed, recorded as row `variant` with its speed-up against cuDNN; its seconds per call."""
    err = rel_err(fn(*args), ref_dense)
    if not err < 2e-2:
        raise SystemExit(f"{what} at {t}: relative error {err} vs cuDNN: not timing it")
    sec = bench(fn, *args, reps=reps, rounds=rounds)
    record(length=t, variant=variant, ms=sec * 1e3, tflops=dense_flops / sec / 1e12, speedup=t_cudnn / sec,
           rel_err=err)
    return sec


def fa2_fields(name: str, t: int, t_fa2: float | None, sec: float) -> dict:
    """A plan row's figures against the FA2-class baseline (none without it): speedup_vs_fa2, and for the paper
    mix rows the paper's own speed-up at this length where it quotes one."""
    if t_fa2 is None:
        return {}
    out = {"speedup_vs_fa2": t_fa2 / sec}
    if name.startswith("paper_mix") and t in baselines.PAPER_PREFILL_VS_FA2:
        out["paper_speedup_vs_fa2"] = baselines.PAPER_PREFILL_VS_FA2[t]
    return out


def decode_rows(t, k, v, record, reps):
    """Context for decode: cuDNN one-token attention over t keys, and the exact XLA indexer top-p selection
    (5 retrieval heads, index_dim 16, 64-token blocks) for one token — the selection's cost at this length."""
    from pallas_kernels.indexer_topp.reference import topp_selection

    q1 = jax.random.normal(jax.random.key(1), (B, 1, N, H), jnp.bfloat16)
    dec = jax.jit(lambda q, k, v: baselines.dense_attention(q, k, v, causal=False))
    t_dec = bench(dec, q1, k, v, reps=reps * 5)
    record(length=t, variant=f"{baselines.name()}_decode_b1", us=t_dec * 1e6, gbps=2 * t * K * H * 2 / t_dec / 1e9)
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

    def label(r):
        return r["variant"] + (f" ({r['backend']}, kb{r['kv_block']})" if r.get("backend") == "triton" else "")

    rows = [dict(r, label=label(r)) for r in res["rows"]
            if "speedup" in r and (r.get("kv_block", 128) == 128 or r.get("backend") == "triton")]
    lengths = sorted({r["length"] for r in rows})
    names = list(dict.fromkeys(r["label"] for r in rows))
    fig, ax = plt.subplots(figsize=(12, 4.5))
    w = 0.8 / len(names)
    colors = plt.get_cmap("tab20").colors
    for i, n in enumerate(names):
        ys = [next((r["speedup"] for r in rows if r["label"] == n and r["length"] == L), 0) for L in lengths]
        ax.bar(np.arange(len(lengths)) + i * w, ys, w, label=n, color=colors[i % len(colors)])
    ax.set_xticks(np.arange(len(lengths)) + 0.4 - w / 2, [f"{L // 1024}K" for L in lengths])
    ax.set_yscale("log")
    ax.set_ylabel(f"speed-up vs {res.get('baseline', 'cudnn')} dense causal")
    ax.axhline(1.0, color="k", lw=0.6)
    ax.set_title(f"one attention layer, B=1, 32q/8kv heads, d=128, bf16 ({res['device']}, jax {res['jax']})",
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    vs_fa2 = [r for r in res["rows"] if "speedup_vs_fa2" in r and r["variant"].startswith("paper_mix")
              and r.get("kv_block") == 128]
    if vs_fa2:
        plot_vs_fa2(res, vs_fa2, path.removesuffix(".png") + "_vs_fa2.png")


def plot_vs_fa2(res: dict, rows: list[dict], path: str) -> None:
    """The paper-mix rows' speed-up against the FA2-class baseline by length (PNG), with the paper's one-layer
    curve against FA2 (32K -> 1M)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = sorted((r["length"], r["speedup_vs_fa2"]) for r in rows if r["variant"] == name)
        ax.plot([x for x, _ in mine], [y for _, y in mine], marker="o", label=name)
    paper = sorted(baselines.PAPER_PREFILL_VS_FA2.items())
    ax.plot([x for x, _ in paper], [y for _, y in paper], "k:", marker="s", label="paper, one layer vs FA2 (H20)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set(xlabel="tokens", ylabel="speed-up vs the FA2-class baseline")
    ax.set_title(f"one layer prefill vs Pallas Triton flash ({res['device']})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
