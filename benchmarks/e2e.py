"""`python -m benchmarks.e2e`: the whole model through the serving API, 32K → 1M tokens, RTPurbo against dense cuDNN.

A Llama-3.1-8B-shaped model (32 q / 8 kv heads, head_dim 128, D 4096, F 14336, vocab 128256, bf16, random
weights: speed does not depend on values) with `--layers` layers. Modes, each in its own process (peak memory
is the process's, OOM stays contained):
- `dense_cudnn`: the dense model with the platform's baseline attention (`benchmarks.baselines`: cuDNN through
  `jax.nn.dot_product_attention(implementation="cudnn")` on GPUs, splash attention on TPUs) — prefill of the
  whole prompt per layer (causal; the MLP in token chunks), decode over a dense cache masked by
  `key_value_seq_lengths`. It runs `model.decoder_layer`, the layer every path runs; only the attention differs.
- `rtpurbo`: `serving.prefill` (chunked, `--chunk`) and `serving.decode_step` over the hybrid cache with the
  device's kernels, the paper's configuration: retrieval = whole GQA groups (kv granularity, 5 of every 32 KV
  heads = 15.6%: layer pattern 2, 1, 1, 1 groups, so 4 layers hold the 32-layer average), 4 sinks + 8192
  window, retrieval heads dense in prefill and on indexer top-p 0.9 at decode.
- `rtpurbo_indexer_prefill`: the same with `prefill_mode="indexer"` (top-p per 128-row query tile in prefill).
- `rtpurbo_shared_keys`: `rtpurbo` with an indexer whose key maps are shared per KV group (`--share-index-keys`)
  served from one index key per group (`SparseConfig.shared_index_keys`: 4x fewer index-key bytes here, each read
  once for the group's 4 heads).

Decode density: the indexer is random, so its weights are scaled until the retrieval heads' top-p set covers
a target share of the visible blocks at B=1 (bisection on `blocks_frac` from `decode_step(stats=True)`; the
measured value is stored per row as `density`). The target is what a **trained** indexer visited where one was
measured near that context — `--densities ACCURACY.json...` (`benchmarks.accuracy` results: the `rtpurbo` rows'
mean blocks_frac over the retrieval tasks, per length; a context within 10% of a measured length takes it) —
else `--density`; each decode row says which in `density_source`. Decode at B=8 copies the B=1 prefill's cache.

Scopes: `layer` rows are (time of `--layers` layers - the head) / layers, the head (embedding, final norm,
logits) timed alone; `model` rows are head + 32 × layer, `measured: false` unless 32 layers ran. Where a
dense run does not fit (OOM) its row is extrapolated from the two shorter contexts (linear in context for
decode, quadratic for prefill attention) and marked `measured: false`. Prefill is time to first token
(compile excluded); decode is ms per step over `--decode-steps` steps enqueued back to back.

Output `OUT.json` (rows `{mode, context, batch, phase, scope, ms, speedup_vs_cudnn, measured, density,
peak_mem_gib, cache_gib}`) and `OUT.png` (speed-up against context next to the paper's curve).
`--profile-prefill CONTEXT...` times the parts of one prefill chunk; `--profile-decode CONTEXT...` lists the
device time per kernel of decode steps (JAX profiler trace) for both modes -> `OUT_decode_profile.json`;
`--contexts` with no value only merges `--merge` files.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import baselines
from benchmarks.output import add_overwrite, claim, write_json
from benchmarks.serve import rel as rel_err
from rtpurbo_jax.indexer import init_indexer, share_key_maps
from rtpurbo_jax.kv_cache import cache_bytes, init_cache
from rtpurbo_jax.model import decoder_layer, logits_from_hidden, project_qkv, rms_norm, rope_cos_sin
from rtpurbo_jax.model_config import LLAMA3_8B
from rtpurbo_jax.params import init_params
from rtpurbo_jax.serving import decode_step, prefill
from rtpurbo_jax.sparse_config import SparseConfig

MODES = ("dense_cudnn", "rtpurbo", "rtpurbo_indexer_prefill", "rtpurbo_shared_keys")
PAPER = baselines.PAPER_PREFILL_VS_FA2
FULL_LAYERS = 32
GIB = 2 ** 30


def model_config(layers: int, small: bool):
    cfg = dataclasses.replace(LLAMA3_8B, num_layers=layers)
    if small:  # a CPU check of the script
        cfg = dataclasses.replace(cfg, hidden_size=128, intermediate_size=256, num_heads=8, num_kv_heads=2,
                                  head_dim=32, vocab_size=512)
    return cfg


def sparse_config(cfg, mode: str, small: bool) -> SparseConfig:
    """kv granularity, retrieval groups per layer cycling 2, 1, 1, 1 (of 8 KV heads: 15.6% on average)."""
    g = cfg.num_heads // cfg.num_kv_heads
    roles = np.zeros((cfg.num_layers, cfg.num_kv_heads), int)
    for li in range(cfg.num_layers):
        roles[li, (np.arange(2 if li % 4 == 0 else 1) + 3 * li) % cfg.num_kv_heads] = 1
    return SparseConfig(roles=np.repeat(roles, g, 1).tolist(), granularity="kv", sinks=4,
                        window=256 if small else 8192, seqlen_threshold=0, top_p=0.9,
                        prefill_mode="indexer" if mode == "rtpurbo_indexer_prefill" else "dense",
                        shared_index_keys=mode == "rtpurbo_shared_keys")


def dense_prefill_fn(cfg, max_len: int, mlp_chunk: int):
    """jit(params, tokens [B, T]) -> (logits fp32 [B, V] of the last token, [(k, v) [B, max_len, K, H]] per
    layer): the dense model, attention of the whole prompt at once (the platform's baseline,
    `benchmarks.baselines`), the rest in `mlp_chunk`-token chunks."""

    def fn(params, tokens):
        b, t = tokens.shape
        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        cos, sin = rope_cos_sin(pos, cfg.rope, cfg.head_dim)
        x = jnp.take(params["embed"], tokens, axis=0)
        c = min(mlp_chunk, t)
        nc = t // c
        split = lambda a: a.reshape((b, nc, c) + a.shape[2:]).swapaxes(0, 1)
        caches = []
        for li in range(cfg.num_layers):
            lp = jax.tree.map(lambda a: a[li], params["layers"])
            qkv = project_qkv(lp, rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps), cfg, cos, sin)
            o = baselines.dense_attention(qkv["q"], qkv["k"], qkv["v"])
            # the rest of the block per token chunk; decoder_layer's own q/k/v projections are unused (DCE'd)
            rest = lambda a: decoder_layer(lp, a[0], cfg, a[2], a[3], lambda _: (a[1], None))[0]
            x = jax.lax.map(rest, (split(x), split(o), split(cos), split(sin))).swapaxes(0, 1).reshape(x.shape)
            pad = ((0, 0), (0, max_len - t), (0, 0), (0, 0))
            caches.append((jnp.pad(qkv["k"], pad), jnp.pad(qkv["v"], pad)))
        h = rms_norm(x[:, -1], params["final_norm"], cfg.rms_norm_eps)
        return logits_from_hidden(params, h, cfg), caches

    return jax.jit(fn)


def dense_decode_fn(cfg):
    """jit(params, caches, lengths int [B] (equal), tokens int [B]) -> (logits fp32 [B, V], caches): one token
    per sequence written at `lengths`, cuDNN decode over the cache masked to lengths + 1."""
    def fn(params, caches, lengths, tokens):
        pos = lengths[:, None]
        cos, sin = rope_cos_sin(pos, cfg.rope, cfg.head_dim)
        x = jnp.take(params["embed"], tokens[:, None], axis=0)
        new = []
        for li, (kc, vc) in enumerate(caches):
            lp = jax.tree.map(lambda a: a[li], params["layers"])

            def attend(qkv, kc=kc, vc=vc):
                at = (0, lengths[0], 0, 0)  # the benchmark's rows share one length
                k = jax.lax.dynamic_update_slice(kc, qkv["k"].astype(kc.dtype), at)
                v = jax.lax.dynamic_update_slice(vc, qkv["v"].astype(vc.dtype), at)
                return baselines.dense_attention(qkv["q"], k, v, causal=False, kv_lengths=lengths + 1), (k, v)

            x, _, kv = decoder_layer(lp, x, cfg, cos, sin, attend)
            new.append(kv)
        h = rms_norm(x[:, 0], params["final_norm"], cfg.rms_norm_eps)
        return logits_from_hidden(params, h, cfg), new

    return jax.jit(fn, donate_argnums=(1,))


def head_ms(params, cfg, batch: int) -> float:
    """ms of one decode step's work outside the layers (embedding gather, final norm, logits) for `batch`
    tokens: the dense decode program with zero layers."""
    cfg0 = dataclasses.replace(cfg, num_layers=0)
    p0 = {**params, "layers": jax.tree.map(lambda a: a[:0], params["layers"])}
    dec = dense_decode_fn(cfg0)
    tok = jnp.arange(batch, dtype=jnp.int32)
    lengths = jnp.zeros((batch,), jnp.int32)
    ms, _ = timed_steps(lambda c: dec(p0, c, lengths, tok), [], 20)
    return ms


def peak_gib() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / GIB if "peak_bytes_in_use" in stats else None


def timed_steps(step, state, steps: int):
    """(ms per step over `steps` steps enqueued back to back, final state); state -> (out, state)."""
    for _ in range(2):  # compile + warm
        out, state = step(state)
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    for _ in range(steps):
        out, state = step(state)
    jax.block_until_ready((out, state))
    return (time.perf_counter() - t0) / steps * 1e3, state


def scaled_indexer(indexer, alpha):
    return {**indexer, "w_q": indexer["w_q"] * alpha}


def trained_densities(paths: list[str]) -> dict[int, tuple[float, str]]:
    """{length: (mean blocks_frac of the `rtpurbo` rows over the retrieval tasks, where it comes from)} from
    `benchmarks.accuracy` result files (several files at one length: the last wins)."""
    from benchmarks.stage2_summary import table

    out = {}
    for path in paths:
        if not os.path.isfile(path):
            raise SystemExit(f"--densities {path}: no such file (benchmarks.accuracy's OUT.json)")
        with open(path) as f:
            res = json.load(f)
        for (mode, length), cell in table(res["rows"]).items():
            if mode == "rtpurbo" and cell["blocks_frac"] is not None:
                out[length] = (float(cell["blocks_frac"]),
                               f"trained: {res.get('model', '?')} rtpurbo at {length} tokens ({os.path.basename(path)})")
    if not out:
        raise SystemExit(f"--densities {' '.join(paths)}: no rtpurbo rows with blocks_frac in these files")
    return out


def density_for(context: int, trained: dict[int, tuple[float, str]], flag: float) -> tuple[float, str]:
    """(decode density target, its source) for `context`: the trained indexer's measurement at a length within
    10% of it (the nearest), else the flag."""
    near = [L for L in trained if abs(L - context) <= 0.1 * context]
    if near:
        return trained[min(near, key=lambda L: abs(L - context))]
    return flag, "flag (--density)"


def calibrate(params, cache, indexer, tok, cfg, sparse, target: float, backend, iters: int = 9):
    """(indexer whose top-p sets cover ~`target` of the visible blocks at decode, measured blocks_frac, cache)."""
    lo, hi = -4.0, 16.0  # log2 of the w_q scale; a larger scale sharpens the scores and shrinks the set
    best = (None, None)
    for _ in range(iters):
        mid = (lo + hi) / 2
        ix = scaled_indexer(indexer, 2.0 ** mid)
        _, cache, st = decode_step(params, cache, tok, ix, cfg=cfg, sparse=sparse, backend=backend, stats=True,
                                   check=False)
        frac = float(np.mean(np.asarray(st["blocks_frac"])))
        if best[1] is None or abs(frac - target) < abs(best[1] - target):
            best = (ix, frac)
        lo, hi = (mid, hi) if frac > target else (lo, mid)
    return best[0], best[1], cache


def check_against_serving(params, cfg, tokens, logits, caches, dec, max_len, backend) -> dict:
    """Relative errors of the cuDNN baseline's prefill and first decode logits against `serving` with full
    attention (sparse=None) on the same prompt."""
    t = tokens.shape[1]
    cache = init_cache(cfg, 1, max_len, None, params["embed"].dtype)
    lg, cache = prefill(params, cache, tokens, jnp.asarray([t]), cfg=cfg, chunk=4096, backend=backend, check=False)
    tok = jnp.argmax(lg, -1).astype(jnp.int32)
    dl, _ = decode_step(params, cache, tok, cfg=cfg, backend=backend, check=False)
    ours, _ = dec(params, jax.tree.map(jnp.copy, caches), jnp.asarray([t], jnp.int32), tok)
    return {"check_rel_err_prefill": rel_err(logits, lg), "check_rel_err_decode": rel_err(ours, dl)}


def worker(spec: dict) -> list[dict]:
    """Rows of one mode at one context, layer scope before scaling (ms of spec['layers'] layers)."""
    small, mode, t, layers = spec["small"], spec["mode"], spec["context"], spec["layers"]
    cfg = model_config(layers, small)
    backend = "reference" if jax.default_backend() == "cpu" else None
    params = init_params(cfg, jax.random.key(0), jnp.bfloat16)
    rng = np.random.default_rng(t)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, t)), jnp.int32)
    max_len = t + 256
    rows, base = [], {"mode": mode, "context": t, "layers_run": layers}
    heads = {b: head_ms(params, cfg, b) for b in spec["batches"]}

    def row(**kw):
        rows.append({**base, **kw, "peak_mem_gib": peak_gib()})
        print(json.dumps(rows[-1]), flush=True)

    if mode == "dense_cudnn":
        pf = dense_prefill_fn(cfg, max_len, spec["chunk"])
        compiled = pf.lower(params, tokens).compile()
        t0 = time.perf_counter()
        logits, caches = compiled(params, tokens)
        jax.block_until_ready((logits, caches))
        cache_gib = sum(k.nbytes + v.nbytes for k, v in caches) / GIB
        row(batch=1, phase="prefill", ms=(time.perf_counter() - t0) * 1e3, head_ms=0.0, density=1.0,
            cache_gib=cache_gib)
        dec = dense_decode_fn(cfg)
        if spec.get("check"):  # the baseline computes the model serving computes (full attention, dense cache)
            rows[-1].update(check_against_serving(params, cfg, tokens, logits, caches, dec, max_len, backend))
        for b in spec["batches"]:
            try:
                cb = jax.tree.map(lambda a: jnp.repeat(a, b, 0), caches)
                state = (cb, jnp.full((b,), t, jnp.int32))
                tok = jnp.asarray(rng.integers(0, cfg.vocab_size, (b,)), jnp.int32)

                def step(s):
                    out, c = dec(params, s[0], s[1], tok)
                    return out, (c, s[1] + 1)

                ms, _ = timed_steps(step, state, spec["decode_steps"])
                row(batch=b, phase="decode", ms=ms, head_ms=heads[b], density=1.0, cache_gib=cache_gib * b)
            except Exception as e:  # noqa: BLE001 - an OOM is a result here, recorded and extrapolated later
                row(batch=b, phase="decode", ms=None, error=str(e).splitlines()[0][:300])
            cb = state = None
        return rows

    sparse = sparse_config(cfg, mode, small)
    indexer = init_indexer(cfg, sparse.index_dim, jax.random.key(1))
    if sparse.shared_index_keys:
        indexer = share_key_maps(indexer, sparse.roles_array, cfg.num_kv_heads)

    def run_prefill():
        cache = init_cache(cfg, 1, max_len, sparse, jnp.bfloat16)
        jax.block_until_ready(cache)
        t0 = time.perf_counter()
        lg, cache = prefill(params, cache, tokens, jnp.asarray([t]), indexer, cfg=cfg, sparse=sparse,
                            chunk=spec["chunk"], backend=backend, check=False)
        jax.block_until_ready((lg, cache))
        return (time.perf_counter() - t0) * 1e3, cache

    if sparse.prefill_mode == "indexer":  # the scale rtpurbo's decode calibration found at this context
        indexer = scaled_indexer(indexer, spec.get("alpha", 1.0))
    run_prefill()  # compiles
    ms, cache = run_prefill()
    cache_gib = cache_bytes(cache)["hybrid"] / GIB
    if sparse.prefill_mode == "indexer":  # decode is rtpurbo's; the prefill's per-tile density is not measured
        row(batch=1, phase="prefill", ms=ms, head_ms=0.0, density=spec.get("decode_density"), cache_gib=cache_gib,
            note="indexer scaled as rtpurbo's decode calibration; density = that decode density")
        return rows
    row(batch=1, phase="prefill", ms=ms, head_ms=0.0, density=None, cache_gib=cache_gib)
    dsp = dataclasses.replace(sparse, prefill_mode="dense")
    caches = {b: jax.tree.map(lambda a: jnp.repeat(a, b, 0), cache) for b in spec["batches"] if b > 1}
    tok1 = jnp.asarray(rng.integers(0, cfg.vocab_size, (1,)), jnp.int32)
    ix, frac, cache = calibrate(params, cache, indexer, tok1, cfg, dsp, spec["density"], backend)
    rows[-1]["alpha"] = float(ix["w_q"].ravel()[0] / indexer["w_q"].ravel()[0])
    caches[1] = cache
    for b in spec["batches"]:
        tok = jnp.asarray(rng.integers(0, cfg.vocab_size, (b,)), jnp.int32)

        def step(c):
            out, c, st = decode_step(params, c, tok, ix, cfg=cfg, sparse=dsp, backend=backend, stats=True,
                                     check=False)
            return (out, st["blocks_frac"]), c

        try:
            ms, _ = timed_steps(step, caches.pop(b), spec["decode_steps"])
            row(batch=b, phase="decode", ms=ms, head_ms=heads[b], density=frac, cache_gib=cache_gib * b,
                density_target=spec["density"], density_source=spec.get("density_source", "flag (--density)"))
        except Exception as e:  # noqa: BLE001
            row(batch=b, phase="decode", ms=None, error=str(e).splitlines()[0][:300])
    return rows


def scope_rows(raw: list[dict], full_layers: int) -> list[dict]:
    """Layer and model rows from the workers' raw rows (ms of `layers_run` layers, head included at decode)."""
    out = []
    for r in raw:
        if r.get("ms") is None:
            continue
        per_layer = (r["ms"] - r["head_ms"]) / r["layers_run"]
        keep = {k: r[k] for k in ("mode", "context", "batch", "phase", "density", "layers_run")}
        keep.update({k: r[k] for k in ("density_source",) if k in r})
        mem = {"peak_mem_gib": r["peak_mem_gib"], "cache_gib": r["cache_gib"] / r["layers_run"]}
        out.append({**keep, "scope": "layer", "ms": per_layer, "measured": True, **mem})
        out.append({**keep, "scope": "model", "ms": r["head_ms"] + full_layers * per_layer,
                    "measured": r["layers_run"] == full_layers, "peak_mem_gib": None,
                    "cache_gib": r["cache_gib"] / r["layers_run"] * full_layers})
    return out


def extrapolate(rows: list[dict], raw: list[dict]) -> list[dict]:
    """Rows for dense runs that failed (OOM), from the two next-shorter measured contexts of that row's kind:
    decode linear in context, prefill quadratic (both fits through the two points), `measured: false`."""
    out = list(rows)
    for r in raw:
        if r.get("ms") is not None:
            continue
        for scope in ("layer", "model"):
            same = sorted((x for x in rows if (x["mode"], x["batch"], x["phase"], x["scope"]) ==
                           (r["mode"], r["batch"], r["phase"], scope) and x["context"] < r["context"]),
                          key=lambda x: x["context"])[-2:]
            if len(same) < 2:
                continue
            (c0, m0), (c1, m1) = ((x["context"], x["ms"]) for x in same)
            p = 1 if r["phase"] == "decode" else 2
            a = (m1 - m0) / (c1 ** p - c0 ** p)
            out.append({**{k: same[1][k] for k in ("mode", "batch", "phase", "density", "layers_run")},
                        "context": r["context"], "scope": scope, "ms": m1 + a * (r["context"] ** p - c1 ** p),
                        "measured": False, "peak_mem_gib": None, "cache_gib": None,
                        "note": f"extrapolated from {c0} and {c1} ({'linear' if p == 1 else 'quadratic'}): "
                                f"{r.get('error', 'not run')}"})
    return out


def add_speedups(rows: list[dict]) -> None:
    dense = {(r["context"], r["batch"], r["phase"], r["scope"]): r["ms"] for r in rows if r["mode"] == "dense_cudnn"}
    for r in rows:
        d = dense.get((r["context"], r["batch"], r["phase"], r["scope"]))
        r["speedup_vs_cudnn"] = None if d is None else d / r["ms"]


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, phase in zip(axes, ("prefill", "decode")):
        for mode in MODES[1:]:
            for b in sorted({r["batch"] for r in res["rows"] if r["phase"] == phase}):
                for scope, style in (("layer", "--"), ("model", "-")):
                    pts = sorted((r["context"], r["speedup_vs_cudnn"], r["measured"]) for r in res["rows"]
                                 if (r["mode"], r["phase"], r["batch"], r["scope"]) == (mode, phase, b, scope)
                                 and r["speedup_vs_cudnn"] is not None)
                    if pts:
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o",
                                label=f"{mode} B={b} {scope}")
        if phase == "prefill":
            xs = sorted(PAPER)
            ax.plot(xs, [PAPER[x] for x in xs], "k:", marker="s", label="paper, one layer vs FA2 (H20)")
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(f"{phase} speed-up vs dense cuDNN")
        if ax.get_legend_handles_labels()[0]:  # nothing to compare without a dense_cudnn row
            ax.legend(fontsize=6)
    fig.suptitle(f"Llama-3.1-8B shape, {res['layers_run']} layers run (model = head + 32 x layer), "
                 f"{res['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.e2e", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="*", default=[1 << k for k in range(15, 21)],
                   help="contexts to run (none: only merge --merge files into OUT.json / .png)")
    p.add_argument("--layers", type=int, default=4, help="layers run (the model rows scale them to 32)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--modes", nargs="+", default=list(MODES[:2]), choices=MODES)
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--chunk", type=int, default=4096, help="prefill chunk (rtpurbo) / MLP chunk (dense)")
    p.add_argument("--density", type=float, default=0.15,
                   help="decode blocks_frac the random indexer is scaled to (Qwen2.5-0.5B's trained indexer "
                        "measured 0.11-0.19 at 8K-32K)")
    p.add_argument("--densities", nargs="+", default=[], metavar="ACCURACY_JSON",
                   help="benchmarks.accuracy results of a trained indexer: their rtpurbo blocks_frac is the decode "
                        "density target at contexts within 10%% of a measured length (--density elsewhere)")
    p.add_argument("--out", default="benchmarks/results/e2e")
    p.add_argument("--merge", nargs="*", default=[], help="earlier OUT.json files whose raw rows join this run's")
    p.add_argument("--small", action="store_true", help="tiny shapes, for a CPU check of the script")
    p.add_argument("--profile-prefill", type=int, nargs="*", default=None, metavar="CONTEXT",
                   help="only time the parts of one rtpurbo prefill chunk of one layer at these positions")
    p.add_argument("--profile-decode", type=int, nargs="*", default=None, metavar="CONTEXT",
                   help="only trace the device kernels of decode steps (4 layers) at these contexts, per batch")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    add_overwrite(p)
    args = p.parse_args(argv)
    if not args.worker:
        suffix = ("_profile.json" if args.profile_prefill is not None else
                  "_decode_profile.json" if args.profile_decode is not None else ".json")
        claim(p, [args.out + suffix], args.overwrite)
    if args.worker:
        print("DEVICE " + jax.devices()[0].device_kind, flush=True)
        rows = worker(json.loads(args.worker))
        print("ROWS " + json.dumps(rows), flush=True)
        return
    if args.profile_prefill is not None:
        from benchmarks.e2e_profile import profile_prefill

        rows = [profile_prefill(t, args.chunk, args.small) for t in args.profile_prefill]
        write_json(args.out + "_profile.json", {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                                                "date": datetime.date.today().isoformat(), "rows": rows})
        return
    if args.profile_decode is not None:
        from benchmarks.e2e_profile import profile_decode

        res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
               "date": datetime.date.today().isoformat(), "rows": []}
        for t in args.profile_decode:
            res["rows"] += profile_decode(t, args.batches, args.small, args.density)
            write_json(args.out + "_decode_profile.json", res)
        return
    if min(args.batches) != 1:
        raise SystemExit("--batches must include 1 (decode calibrates its density and prefills at batch 1)")
    merged = []
    for path in args.merge:
        with open(path) as f:
            merged.append(json.load(f))
    raw = [r for m in merged for r in m["raw"]]
    trained = trained_densities(args.densities) if args.densities else {}
    # the baseline that ran: this machine's when it runs contexts, else the merged files' (a merge on a CPU is not xla)
    dense_baseline = (baselines.name() if args.contexts or not merged
                      else merged[0].get("config", {}).get("dense_baseline", baselines.name()))
    res = {"device": None, "jax": jax.__version__, "date": datetime.date.today().isoformat(),
           "model": "Llama-3.1-8B shape, random bf16 weights", "layers_run": args.layers, "full_layers": FULL_LAYERS,
           "config": {"dense_baseline": dense_baseline,
                      "retrieval": "kv granularity, 2/1/1/1 of 8 KV groups per layer (15.6%)", "sinks": 4,
                      "window": 8192, "top_p": 0.9, "prefill_chunk": args.chunk, "decode_steps": args.decode_steps,
                      "density_target": args.density,
                      "density_source": ("per decode row: a trained indexer's blocks_frac (--densities) near its "
                                         "context, else the flag; the random indexer scaled to it")
                      if trained else "flag (random indexer scaled to it)"},
           "raw": raw, "rows": []}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    for t in args.contexts:
        for mode in args.modes:
            target, source = density_for(t, trained, args.density)
            spec = {"small": args.small, "mode": mode, "context": t, "layers": args.layers, "chunk": args.chunk,
                    "batches": args.batches, "decode_steps": args.decode_steps, "density": target,
                    "density_source": source, "check": t == min(args.contexts)}
            cal = [r for r in res["raw"] if (r["mode"], r["context"], r["phase"]) == ("rtpurbo", t, "prefill")
                   and "alpha" in r]
            if mode == "rtpurbo_indexer_prefill" and cal:
                dd = [r for r in res["raw"] if (r["mode"], r["context"], r["phase"]) == ("rtpurbo", t, "decode")]
                spec.update(alpha=cal[0]["alpha"], decode_density=dd[0]["density"] if dd else None)
            t0 = time.time()
            print(f"[e2e] {mode} at {t} tokens, {args.layers} layers ...", flush=True)
            env = {**os.environ, "XLA_PYTHON_CLIENT_MEM_FRACTION": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION",
                                                                                   "0.95")}
            proc = subprocess.run([sys.executable, "-m", "benchmarks.e2e", "--worker", json.dumps(spec)],
                                  capture_output=True, text=True, env=env)
            got = [json.loads(line[5:]) for line in proc.stdout.splitlines() if line.startswith("ROWS ")]
            if got:
                res["raw"] += got[0]
            else:  # the process died (e.g. OOM at allocation): one failed row per phase and batch
                err = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
                res["raw"] += [{"mode": mode, "context": t, "layers_run": args.layers, "batch": b, "phase": ph,
                                "ms": None, "error": err} for ph, bs in (("prefill", [1]), ("decode", args.batches))
                               for b in bs]
                print(proc.stderr[-3000:], flush=True)
            print(f"[e2e] {mode} at {t}: {time.time() - t0:.0f}s", flush=True)
            for line in proc.stdout.splitlines():
                if line.startswith("DEVICE "):
                    res["device"] = line[7:]
            res["rows"] = extrapolate(scope_rows(res["raw"], FULL_LAYERS), res["raw"])
            add_speedups(res["rows"])
            write_json(args.out + ".json", res)  # after every process: a timeout keeps what ran
    res["device"] = res["device"] or next((m["device"] for m in merged if m.get("device")), None)
    res["rows"] = extrapolate(scope_rows(res["raw"], FULL_LAYERS), res["raw"])
    add_speedups(res["rows"])
    write_json(args.out + ".json", res)
    try:
        plot(res, args.out + ".png")
    except ImportError as e:  # no matplotlib on the device: plot from the JSON later (--merge OUT.json --contexts)
        print(f"no plot: {e}")
    print(f"wrote {args.out}.json / .png")


if __name__ == "__main__":
    main()
