"""`python -m benchmarks.stage2_step`: what stage 2 costs per differentiable attention backend, on the GPU.

Three parts, one JSON (+ PNG) under --out:
- **check**: the "xla" backend's gradients (bf16 inputs) against autodiff of the reference (fp32) on a random
  mixed plan, with the bf16 reference's own error beside them (the derived tolerance of the CPU tests); the run
  fails when they disagree;
- **op rows**: one layer's block-sparse attention (15% retrieval heads at a top-p-like density, the rest sinks +
  window) forward and forward + backward, "xla" vs "reference", and cuDNN dense causal attention forward +
  backward (`jax.nn.dot_product_attention`) from the same run;
- **step rows**: the stage-2 training step (`train.stage2.stage2_loss`: the student's logits at the teacher's
  top-10 ids, eq. 7, `jax.value_and_grad`, remat) of a model shape with random bf16 weights, 15% random retrieval
  heads and a random indexer (speed does not depend on values; the top-p density of a random indexer differs from
  a trained one's, stated in the row), per backend; tokens/s. Beside it per fast backend: `step_dense_retrieval` (no
  selection), `step_tail` (`--loss topk_tail`: the student's logsumexp over the vocabulary on top) and
  `step_tail_answers` (the same on a task window's 16 answer rows: the other row chunks skip the vocabulary).

    python -m benchmarks.stage2_step --steps smollm2:8192 qwen25_05b:16384 qwen25_05b:32768 \
        --ops 8192 32768 --out benchmarks/results/stage2_step_h200
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.kernels import bench
from benchmarks.output import add_overwrite, claim, write_json
from benchmarks.prefill_plans import layer_plan
from pallas_kernels.sparse_attention.api import block_sparse_attention
from rtpurbo_jax.indexer import init_indexer
from rtpurbo_jax.model_config import QWEN25_05B, SMOLLM2_135M
from rtpurbo_jax.params import init_params
from rtpurbo_jax.sparse_config import SparseConfig

MODELS = {"smollm2": (SMOLLM2_135M, 2048), "qwen25_05b": (QWEN25_05B, 8192)}  # shape, local window of its runs
BACKENDS = ("xla", "triton", "reference")


def grad_check(small: bool, backends) -> dict:
    """Max relative errors of dq, dk, dv: each backend in bf16 and the reference in bf16, each against the fp32
    reference; within_derived_tolerance when every backend's error <= 2 x the bf16 reference's + 0.2%."""
    t, n, k, h = (200, 4, 2, 32) if small else (1500, 14, 2, 64)
    plan, _ = layer_plan("mix", t, n, qb=128, kb=64, density=0.3, retrieval=2, window=256, sinks=4)
    rng = np.random.default_rng(0)
    q, kk, v = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((1, t, n, h), (1, t, k, h), (1, t, k, h)))
    w = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

    def grads(backend, dtype):
        interpret = small and backend == "triton"
        f = lambda *x: (block_sparse_attention(*x, plan, backend=backend, interpret=interpret).astype(jnp.float32)
                        * w).sum()
        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(*(x.astype(dtype) for x in (q, kk, v)))

    ref = grads("reference", jnp.float32)
    rel = lambda gs: [float(jnp.abs(g.astype(jnp.float32) - r).max() / jnp.abs(r).max()) for g, r in zip(gs, ref)]
    out = {"shape": [t, n, k, h], "reference_bf16_rel_err_dq_dk_dv": rel(grads("reference", jnp.bfloat16))}
    ok = True
    for backend in (b for b in backends if b != "reference"):
        out[f"{backend}_bf16_rel_err_dq_dk_dv"] = got = rel(grads(backend, jnp.bfloat16))
        ok &= all(a <= 2 * b + 2e-3 for a, b in zip(got, out["reference_bf16_rel_err_dq_dk_dv"]))
    out["within_derived_tolerance"] = bool(ok)
    return out


def op_rows(t: int, cfg, window: int, reps: int, backends=BACKENDS) -> list[dict]:
    """One layer of `cfg`'s heads at t tokens: forward and forward + backward per backend, cuDNN dense beside."""
    n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    plan, visited = layer_plan("mix", t, n, qb=128, kb=64, density=0.15, retrieval=max(1, round(0.15 * n)),
                               window=window, sinks=4)
    rng = np.random.default_rng(1)
    q, kk, v = (jnp.asarray(rng.normal(size=s), jnp.bfloat16) for s in ((1, t, n, h), (1, t, k, h), (1, t, k, h)))
    rows = []

    def time_row(name, f, phase):
        try:
            ms = 1e3 * bench(f, q, kk, v, reps=reps, rounds=3)
            rows.append({"scope": "op", "length": t, "backend": name, "phase": phase, "ms": ms,
                         "visited_blocks": visited})
        except Exception as e:  # noqa: BLE001 — an OOM of the reference is a result, recorded
            rows.append({"scope": "op", "length": t, "backend": name, "phase": phase, "error": str(e)[:300]})
        print(json.dumps(rows[-1]), flush=True)

    for backend in backends:
        fwd = jax.jit(lambda q, k, v, b=backend: block_sparse_attention(q, k, v, plan, backend=b))
        loss = lambda q, k, v, b=backend: block_sparse_attention(q, k, v, plan, backend=b).astype(jnp.float32).sum()
        time_row(backend, fwd, "fwd")
        time_row(backend, jax.jit(jax.grad(loss, argnums=(0, 1, 2))), "fwd+bwd")
    if jax.default_backend() == "gpu":
        dense = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
        time_row("cudnn_dense", jax.jit(dense), "fwd")
        time_row("cudnn_dense", jax.jit(jax.grad(lambda *x: dense(*x).astype(jnp.float32).sum(), argnums=(0, 1, 2))),
                 "fwd+bwd")
    return rows


def step_rows(model: str, t: int, reps: int, small: bool, backends=BACKENDS, profile: bool = False) -> list[dict]:
    """The stage-2 value-and-grad (remat) and the student forward per backend, on random weights."""
    from train.stage2 import stage2_loss, student_logits

    cfg, window = MODELS[model]
    if small:
        cfg = dataclasses.replace(cfg, num_layers=2, hidden_size=64, intermediate_size=128, vocab_size=512)
        window = 64
    rng = np.random.default_rng(0)
    roles = np.zeros((cfg.num_layers, cfg.num_heads), int)
    roles.reshape(-1)[rng.choice(roles.size, max(1, round(0.15 * roles.size)), replace=False)] = 1
    sparse = SparseConfig(roles=roles.tolist(), sinks=4, window=window, kv_block=64, q_block=128, index_dim=16,
                          top_p=0.9, seqlen_threshold=0, prefill_mode="indexer")
    params = init_params(cfg, jax.random.key(0), jnp.bfloat16)
    ix = init_indexer(cfg, 16, jax.random.key(1))
    toks = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, t)), jnp.int32)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, t, 10)), jnp.int32)
    vals = jnp.asarray(rng.normal(size=(1, t, 10)), jnp.float32)
    t_lse = jax.nn.logsumexp(vals, -1) + 2.0  # a teacher with mass off its top-10
    w = jnp.ones((1, t), jnp.float32)
    w_answers = jnp.zeros((1, t), jnp.float32).at[:, -16:].set(1.0)  # a task window's answer span: its last rows
    rows = []
    dense_ret = dataclasses.replace(sparse, prefill_mode="dense")
    for backend in backends:
        # step_dense_retrieval: the same step with retrieval heads dense in prefill (no selection): what the
        # indexer's top-p costs, by difference
        # step_tail: the step with --loss topk_tail (the student's logsumexp over the vocabulary, chunked, on top);
        # step_tail_answers: the same with only the last 16 rows weighted (the other row chunks skip the vocabulary)
        fast = ("step_dense_retrieval", "step_tail", "step_tail_answers")
        for phase in ("fwd", "step") + (fast if backend != "reference" else ()):
            sp = dense_ret if phase == "step_dense_retrieval" else sparse
            tail = phase.startswith("step_tail")
            wp = w_answers if phase == "step_tail_answers" else w
            if phase == "fwd":
                f = jax.jit(lambda p, tk, b=backend, sp=sp: student_logits(p, tk, cfg, sp, ix, at=ids, attn_backend=b))
            else:  # what the training step differentiates (`train.stage2.stage2_loss`)
                f = jax.jit(jax.value_and_grad(lambda p, tk, b=backend, sp=sp, tail=tail, wp=wp: stage2_loss(
                    p, ix, tk, wp, (ids, vals, t_lse) if tail else (ids, vals), cfg=cfg, sparse=sp, remat=True,
                    attn_backend=b, loss="topk_tail" if tail else "topk")))
            row = {"scope": "step", "model": model, "length": t, "backend": backend, "phase": phase,
                   "weights": "random bf16", "retrieval_heads": int(roles.sum()), "total_heads": int(roles.size)}
            try:
                t0 = time.perf_counter()
                jax.block_until_ready(f(params, toks))
                row["first_call_s"] = time.perf_counter() - t0
                row["ms"] = 1e3 * bench(f, params, toks, reps=reps, rounds=2)
                row["tokens_per_s"] = t / (row["ms"] / 1e3)
            except Exception as e:  # noqa: BLE001 — an OOM of the reference is a result, recorded
                row["error"] = str(e)[:300]
            rows.append(row)
            print(json.dumps(row), flush=True)
            if profile and backend != "reference" and phase == "step" and "ms" in row:
                row["top_kernels_us_per_step"] = top_kernels(f, params, toks)
    return rows


def top_kernels(f, *args, top: int = 20) -> dict:
    """{kernel: device µs per call} of the `top` costliest kernels over two profiled calls."""
    import tempfile

    from benchmarks.e2e_profile import device_kernels

    d = tempfile.mkdtemp()
    with jax.profiler.trace(d, create_perfetto_trace=True):
        for _ in range(2):
            jax.block_until_ready(f(*args))
    k = device_kernels(d, 2)["kernels"]
    return {"total": float(sum(k.values())), **dict(list(k.items())[:top])}


def add_ratios(rows: list[dict]) -> None:
    """speedup_vs_reference on every xla row; vs_cudnn_dense (cuDNN ms / this ms) on op rows."""
    key = lambda r: (r["scope"], r.get("model"), r["length"], r["phase"])
    ref = {key(r): r["ms"] for r in rows if r["backend"] == "reference" and "ms" in r}
    cud = {key(r): r["ms"] for r in rows if r["backend"] == "cudnn_dense" and "ms" in r}
    for r in rows:
        if "ms" in r and r["backend"] not in ("reference", "cudnn_dense") and key(r) in ref:
            r["speedup_vs_reference"] = ref[key(r)] / r["ms"]
        if "ms" in r and key(r) in cud and r["backend"] != "cudnn_dense":
            r["vs_cudnn_dense"] = cud[key(r)] / r["ms"]


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["rows"] if r["scope"] == "step" and r["phase"] == "step"]
    labels = sorted({(r["model"], r["length"]) for r in rows}, key=lambda x: (x[0], x[1]))
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(BACKENDS)
    for i, backend in enumerate(BACKENDS):
        vals = [next((r.get("tokens_per_s", 0.0) for r in rows if (r["model"], r["length"]) == lab
                      and r["backend"] == backend), 0.0) for lab in labels]
        ax.bar(np.arange(len(labels)) + (i - (len(BACKENDS) - 1) / 2) * width, vals, width, label=f"attn_backend={backend}")
    ax.set_xticks(np.arange(len(labels)), [f"{m}\n{t // 1024}K" for m, t in labels])
    ax.set_ylabel("training tokens / s (value_and_grad, remat)")
    ax.set_title(f"stage-2 step, {res['device']} (0 = did not run: see the JSON)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stage2_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", nargs="*", default=["smollm2:8192"], help="MODEL:LENGTH, MODEL in " + ", ".join(MODELS))
    p.add_argument("--ops", nargs="*", type=int, default=[8192], help="op rows at these lengths (Qwen's heads)")
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="top kernels of each xla step (a profiler trace)")
    p.add_argument("--small", action="store_true", help="tiny shapes: a CPU check of the script")
    p.add_argument("--out", required=True, help="output prefix (writes OUT.json and OUT.png)")
    add_overwrite(p)
    a = p.parse_args(argv)
    claim(p, [a.out + ".json"], a.overwrite)
    res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "date": str(datetime.date.today()),
           "command": "python -m benchmarks.stage2_step " + " ".join(sys.argv[1:] if argv is None else argv)}
    res["check"] = grad_check(a.small, a.backends)
    print(json.dumps(res["check"]), flush=True)
    rows = []
    for t in a.ops:
        rows += op_rows(t, dataclasses.replace(QWEN25_05B, head_dim=32) if a.small else QWEN25_05B,
                        64 if a.small else 8192, a.reps, a.backends)
    for spec in a.steps:
        model, t = spec.split(":")
        rows += step_rows(model, int(t), a.reps, a.small, a.backends, a.profile)
    add_ratios(rows)
    res["rows"] = rows
    write_json(a.out + ".json", res)
    plot(res, a.out + ".png")
    print(f"wrote {a.out}.json / .png", flush=True)
    return 0 if res["check"]["within_derived_tolerance"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
