"""`python -m benchmarks.teacher`: what stage 2's teacher cache costs per window, per full-attention backend.

The teacher is `lm.apply(mode="full")`'s final hidden states followed by the top-k of their logits, 2048 rows at a
time (`model.topk_from_hidden`: never the whole fp32 [B, T, V]), one jitted call per training batch
(`TeacherCache.build`; `teacher_smollm2_8k_h200.json` timed the earlier whole-logits version). This times that call on a model shape with random bf16
weights (speed does not depend on values) for each `--backends` entry of the block-sparse op ("reference": fp32
scores of every pair; "none": the op's pick for the device — on Hopper the Mosaic GPU kernel, else Triton), and
compares every backend's top-k with the first one's (fraction of positions whose top-1 id matches, of the k ids
shared, and the largest difference of the top-1 logit). One JSON under --out (device, jax version, date, every
figure) and a PNG beside it:

    python -m benchmarks.teacher --model smollm2 --seq-len 8192 --batch 1 \
        --out benchmarks/results/teacher_smollm2_8k_h200.json
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

from benchmarks.output import add_overwrite, claim, write_json
from rtpurbo_jax.lm import apply
from rtpurbo_jax.model import topk_from_hidden
from rtpurbo_jax.model_config import QWEN25_05B, SMOLLM2_135M
from rtpurbo_jax.params import init_params

MODELS = {"smollm2": SMOLLM2_135M, "qwen25_05b": QWEN25_05B}


def time_call(fn, *args, reps: int) -> tuple[float, float, tuple]:
    """(compile + first call s, median s of `reps` further calls, the last result as numpy)."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return first, float(np.median(times)), tuple(np.asarray(x) for x in out)


def plot(result: dict, path: str) -> None:
    """Bar chart of windows/s per backend (PNG at `path`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.bar([r["backend"] for r in rows], [r["windows_per_s"] for r in rows], color=["#888", "#2a7"])  # cycled
    for i, r in enumerate(rows):
        ax.text(i, r["windows_per_s"], f"{r['windows_per_s']:.1f}", ha="center", va="bottom")
    ax.set(ylabel="teacher windows / s", xlabel="attention backend (none: the device's kernel)",
           title=f"{result['model']} {result['seq_len'] // 1024}K, {result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--backends", nargs="+", default=["reference", "none"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", required=True, help="the JSON; its PNG is written beside it")
    p.add_argument("--plot-only", action="store_true", help="redraw the PNG of an existing --out JSON")
    add_overwrite(p)
    a = p.parse_args(argv)
    if not a.plot_only:
        claim(p, [a.out], a.overwrite)
    png = os.path.splitext(a.out)[0] + ".png"
    if a.plot_only:
        plot(json.load(open(a.out)), png)
        return 0
    cfg = MODELS[a.model]
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), init_params(cfg, jax.random.key(0), scale=0.05))
    tokens = jax.random.randint(jax.random.key(1), (a.batch, a.seq_len), 0, cfg.vocab_size)
    rows, first = [], None
    for name in a.backends:
        backend = None if name == "none" else name
        fn = jax.jit(lambda p_, t: topk_from_hidden(p_, apply(p_, t, cfg, attn_backend=backend, return_hidden=True),
                                                    cfg, a.top_k))
        compile_s, s, (ids, vals) = time_call(fn, params, tokens, reps=a.reps)
        row = {"backend": name, "compile_and_first_s": round(compile_s, 3), "s_per_call": round(s, 4),
               "windows_per_s": round(a.batch / s, 3), "tokens_per_s": round(a.batch * a.seq_len / s, 1)}
        if first is None:
            first = ids, vals
        else:  # a random model's top logits are close: its ids flip where a trained model's would not
            row["top1_agrees_with_first"] = float((ids[..., 0] == first[0][..., 0]).mean())
            row["topk_overlap_with_first"] = float((ids[..., :, None] == first[0][..., None, :]).any(-1).mean())
            row["max_abs_diff_of_top1_logit"] = float(np.abs(vals[..., 0] - first[1][..., 0]).max())
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = {"device": jax.devices()[0].device_kind, "platform": jax.default_backend(), "jax": jax.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "model": a.model, "weights": "random bf16 (init_params scale 0.05)", "seq_len": a.seq_len,
           "batch": a.batch, "top_k": a.top_k, "reps": a.reps, "rows": rows}
    if len(rows) > 1:
        out["speedup_vs_first"] = {r["backend"]: round(rows[0]["s_per_call"] / r["s_per_call"], 2) for r in rows[1:]}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    write_json(a.out, out)
    plot(out, png)
    print(json.dumps(out.get("speedup_vs_first", {})))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
