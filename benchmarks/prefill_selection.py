"""`python -m benchmarks.prefill_selection`: what indexer prefill's selection costs next to the attention it feeds.

For one layer's R retrieval heads over a whole causal prompt of T tokens (B=1): the top-p block selection of
every 128-row tile (`pallas_kernels.indexer_topp.api.prefill_selection`, each backend: reference — token scores
per tile in a `lax.map`, sort-based; xla — the same masses, sort-free top-p; triton — one tile-mass kernel, then
the sort-free top-p) against the platform's dense attention of those R heads (`benchmarks.baselines`: cuDNN on
GPUs) in the same process. Index vectors are random with scale `--scale` (peaked enough that top-p keeps a
fraction of the blocks, reported as `blocks_frac`); every backend's selection is compared with the reference's
(`mismatch_frac`: tiles whose set differs — rounding at the top-p threshold can move a block).

    python -m benchmarks.prefill_selection [--contexts 8192 32768 131072] [--heads 5] [--out PREFIX]

Writes PREFIX.json ({device, jax, date, config, rows: [{context, backend, ms, vs_dense_attention, blocks_frac,
mismatch_frac}]}) and PREFIX.png.
"""

from __future__ import annotations

import argparse
import datetime
import json

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import baselines
from benchmarks.kernels import bench
from benchmarks.output import add_overwrite, claim, write_json
from benchmarks.prefill_plans import causal_block_count
from pallas_kernels.indexer_topp.api import prefill_selection


def run(t: int, heads: int, index_dim: int, head_dim: int, scale: float, backends: list[str], top_p: float,
        tile: int = 128, kv_block: int = 64, interpret: bool = False) -> list[dict]:
    keys = iter(jax.random.split(jax.random.key(t), 8))
    q_idx = jax.random.normal(next(keys), (1, t, heads, index_dim), jnp.float32) * scale
    k_idx = (jax.random.normal(next(keys), (1, t, heads, index_dim), jnp.float32) * scale).astype(jnp.bfloat16)
    q_pos = jnp.arange(t, dtype=jnp.int32)[None]
    kv_len = jnp.asarray([t], jnp.int32)
    q, k, v = (jax.random.normal(next(keys), (1, t, heads, head_dim), jnp.bfloat16) for _ in range(3))
    dense = jax.jit(lambda q, k, v: baselines.dense_attention(q, k, v))
    dense_ms = bench(dense, q, k, v, reps=3, rounds=3) * 1e3
    rows = [{"context": t, "backend": f"dense_attention_{baselines.name()}", "ms": dense_ms, "vs_dense_attention": 1.0}]
    want = None
    causal_blocks = causal_block_count(t, tile, kv_block)  # per head
    for be in backends:
        fn = jax.jit(lambda q_idx, k_idx, be=be: prefill_selection(
            q_idx, k_idx, q_pos, kv_len, tile=tile, top_p=top_p, kv_block=kv_block, sinks=4, keep_recent=64,
            backend=be, interpret=interpret))
        try:
            sel = np.asarray(fn(q_idx, k_idx))
            ms = bench(fn, q_idx, k_idx, reps=3, rounds=3) * 1e3
        except Exception as e:  # a backend that does not run here (e.g. triton on a CPU without interpret)
            rows.append({"context": t, "backend": be, "ms": None, "error": str(e).splitlines()[0][:300]})
            continue
        if want is None and be == "reference":
            want = sel
        row = {"context": t, "backend": be, "ms": ms, "vs_dense_attention": ms / dense_ms,
               "blocks_frac": float(sel.sum() / (heads * causal_blocks)),
               "mismatch_frac": None if want is None else float((sel != want).any(-1).mean())}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for be in dict.fromkeys(r["backend"] for r in res["rows"]):
        pts = [(r["context"], r["ms"]) for r in res["rows"] if r["backend"] == be and r.get("ms")]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=be)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens (one layer, B=1)")
    ax.set_ylabel("ms")
    ax.set_title(f"indexer prefill selection vs dense attention of {res['config']['heads']} heads, "
                 f"{res['device']}", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.prefill_selection", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--heads", type=int, default=5, help="retrieval heads of the layer (15%% of 32: 5)")
    p.add_argument("--index-dim", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--scale", type=float, default=1.5, help="std of the random index vectors")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--backends", nargs="+", default=["reference", "xla", "triton"])
    p.add_argument("--interpret", action="store_true", help="run Pallas kernels in interpret mode (CPU checks)")
    p.add_argument("--out", default=None, help="output prefix (default benchmarks/results/prefill_selection_<device>)")
    add_overwrite(p)
    a = p.parse_args(argv)
    if "reference" in a.backends:  # the reference first: the others are compared with it
        a.backends = ["reference"] + [b for b in a.backends if b != "reference"]
    for t in a.contexts:
        if t % 128:
            raise ValueError(f"--contexts {t}: must be a multiple of 128 (whole tiles)")
    device = jax.devices()[0].device_kind
    out = a.out or f"benchmarks/results/prefill_selection_{device.lower().replace(' ', '_')}"
    claim(p, [out + ".json"], a.overwrite)
    res = {"device": device, "jax": jax.__version__, "date": datetime.date.today().isoformat(),
           "config": {"heads": a.heads, "index_dim": a.index_dim, "head_dim": a.head_dim, "scale": a.scale,
                      "top_p": a.top_p, "tile": 128, "kv_block": 64, "batch": 1}, "rows": []}
    for t in a.contexts:
        res["rows"] += run(t, a.heads, a.index_dim, a.head_dim, a.scale, a.backends, a.top_p, interpret=a.interpret)
        write_json(out + ".json", res)
    plot(res, out + ".png")
    print(f"[prefill_selection] wrote {out}.json / .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
