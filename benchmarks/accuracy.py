"""`python -m benchmarks.accuracy`: does sparse attention answer like full attention? RULER-style tasks
(`rtpurbo_jax.evals.tasks`) and held-out perplexity, through the public serving API (`prefill` then `decode_step`
over the hybrid KV cache), several attention modes on the same prompts.

    python -m benchmarks.accuracy --converted runs/x/converted --indexer runs/x/indexer \\
        [--indexer prose=runs/y/indexer] [--lengths 2048 4096 8000] [--prompts 20] [--windows 512 1024]

Modes (every sparse mode runs the split at every length: `seqlen_threshold` is set to 0, stated in `config`):
- full: dense cache, plain causal attention;
- dense_retrieval: the calibrated retrieval heads dense, the other heads sinks + window;
  dense_retrieval_w<W>: the same with window W (the window sweep);
- local_only: every head sinks + window; random_heads: as many random heads dense, the rest local;
- rtpurbo: the shipped config (roles, window, top-p from `rtpurbo.json`) with the first indexer, top-p at
  decode; rtpurbo_p0.95 / rtpurbo_p0.99; rtpurbo_indexer_prefill (retrieval heads' prefill on indexer top-p
  plans too); rtpurbo_fp8_index (the cache's index keys in float8_e4m3fn, `SparseConfig.index_dtype`);
  rtpurbo@NAME for every further `--indexer NAME=DIR`;
- oracle_topp: top-p over the head's exact attention block masses, same p (the ceiling of any indexer);
- topk_same_budget: a fixed number of blocks per retrieval head, equal to rtpurbo's mean at that length.
Rows: {mode, task, kind, length, n, score, scores, blocks_frac}; score is 0-100 (mean of the per-prompt `scores`),
for kind "ppl" it is the perplexity of the last 64 tokens of held-out text (KJV's eval split, or with `--ppl-text
stdlib` Python standard-library source; decoded token by token, teacher-forced; per-prompt mean NLL per token in
`nll_per_token`). blocks_frac: mean over decode steps and retrieval heads of the fraction of visible key blocks
visited. `paired_vs_full`: every mode against full attention on the same prompts (`paired`): the mean per-prompt
score difference over the five NIAH tasks with its standard error and 95% interval, and the perplexity ratio with
its interval — prompts shared by both modes cancel out, so these intervals are much narrower than two separate
means' would be. `--compare A.json B.json` runs nothing: it compares two result files of the same prompts (same
model, --prompts and --seed) mode by mode, B minus A, the same way (e.g. two indexers, or before and after stage 2,
from separate runs).
OUT_paired.png draws `paired_vs_full` (each mode's difference with its interval, per length).
The JSON is rewritten atomically after every cell; an existing one is never replaced without `--overwrite`,
and `--resume` keeps the cells an interrupted run of the same configuration (model, device, roles, prompts,
seed, indexers, dtype) saved and runs the rest.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.output import write_json
from rtpurbo_jax.evals.decoding import run_batch
from rtpurbo_jax.evals.tasks import NIAH_TASKS, TASKS, Builder, make_prompt, max_new_tokens, score
from rtpurbo_jax.indexer import unshared_key_groups
from rtpurbo_jax.serving import check_indexer
from rtpurbo_jax.sparse_config import SparseConfig

PPL_TOKENS = 64


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    sparse: SparseConfig | None  # None: full attention over a dense cache
    indexer: str | None = None  # name of the indexer it runs with


def build_modes(shipped: SparseConfig, indexers: list[str] | dict[str, int], windows: list[int], seed: int,
                only: list[str] | None = None) -> list[Mode]:
    """The benchmark's modes (see the module docstring), in the order they run. indexers: their names (the first
    is the shipped one), or name -> index_dim (`index_dims`): a mode that runs with an indexer gets its width (one
    trained with another --index-dim than the converted model's rtpurbo.json names runs at its own width, and its
    cache's index keys follow)."""
    base = dataclasses.replace(shipped, seqlen_threshold=0)
    dense = dataclasses.replace(base, top_p=1.0, max_blocks=None)
    roles = shipped.roles_array
    rnd = np.zeros(roles.size, bool)
    rnd[np.random.default_rng(seed).choice(roles.size, int(roles.sum()), replace=False)] = True
    first = next(iter(indexers), None)
    modes = [Mode("full", None), Mode("dense_retrieval", dense, first),
             Mode("local_only", dataclasses.replace(dense, roles=np.zeros_like(roles))),
             Mode("random_heads", dataclasses.replace(dense, roles=rnd.reshape(roles.shape)))]
    modes += [Mode(f"dense_retrieval_w{w}", dataclasses.replace(dense, window=w)) for w in windows if w != base.window]
    if first is not None:
        modes += [Mode("rtpurbo", base, first),
                  Mode("rtpurbo_p0.95", dataclasses.replace(base, top_p=0.95), first),
                  Mode("rtpurbo_p0.99", dataclasses.replace(base, top_p=0.99), first),
                  Mode("rtpurbo_indexer_prefill", dataclasses.replace(base, prefill_mode="indexer"), first),
                  Mode("rtpurbo_fp8_index", dataclasses.replace(base, index_dtype="float8_e4m3fn"), first)]
        modes += [Mode(f"rtpurbo@{n}", base, n) for n in list(indexers)[1:]]
    modes += [Mode("oracle_topp", dataclasses.replace(base, selector="oracle"), first)]
    if first is not None:
        modes += [Mode("topk_same_budget", None, first)]  # sparse filled per length from rtpurbo's blocks
    dims = indexers if isinstance(indexers, dict) else {}
    modes = [dataclasses.replace(m, sparse=dataclasses.replace(m.sparse, index_dim=dims[m.indexer]))
             if m.sparse is not None and m.indexer in dims else m for m in modes]
    return [m for m in modes if only is None or m.name in only]


def with_shared_index_keys(modes: list[Mode], indexers: dict[str, dict], roles: np.ndarray, num_kv_heads: int):
    """`modes`, those whose indexer shares its key maps per KV group (`train.distill --share-index-keys`) and that
    select with it serving from a cache of one index key per group (`SparseConfig.shared_index_keys`): the suite
    measures what serving such an indexer costs, and the cache holds its real bytes."""
    g = roles.shape[1] // num_kv_heads
    grouped = (roles.reshape(roles.shape[0], num_kv_heads, g).sum(-1) > 1).any()
    shared = {n for n, ix in indexers.items() if grouped and not unshared_key_groups(ix, roles, num_kv_heads)}
    for n in sorted(shared):
        print(f"[accuracy] indexer {n!r} shares its key maps per KV group: its modes store one index key per group")
    return [dataclasses.replace(m, sparse=dataclasses.replace(m.sparse, shared_index_keys=True))
            if m.indexer in shared and m.sparse is not None and m.sparse.selector == "indexer" else m for m in modes]


def index_dims(indexers: dict[str, dict]) -> dict[str, int]:
    """name -> index_dim (the width of its w_q) of loaded indexers, for `build_modes`."""
    return {name: int(ix["w_q"].shape[-1]) for name, ix in indexers.items()}


# SparseConfig fields a prefill with dense retrieval heads never reads (they steer the decode-time selection)
DECODE_ONLY = ("top_p", "max_blocks", "keep_recent", "selector")


def _prefill_key(m: Mode):
    """Modes whose prefills write the same cache share one prefill: the whole SparseConfig and the indexer decide,
    less the decode-only fields when retrieval heads prefill dense (a field added later splits groups, never
    merges them)."""
    s = m.sparse
    if s is None:
        return ("full",)
    fields = dataclasses.asdict(s)
    if s.prefill_mode == "dense":
        fields = {k: v for k, v in fields.items() if k not in DECODE_ONLY}
    return tuple(sorted(fields.items())), m.indexer


PPL_TEXTS = ("kjv", "stdlib")


def ppl_prompts(tok, length: int, n: int, seed: int, text: str = "kjv"):
    """(tokens int32 [n, length], lengths [n]): held-out text whose last PPL_TOKENS tokens are scored; prefill
    takes the first length - PPL_TOKENS. text: "kjv" (the corpus `eval` split; in-domain for stage 2's --data kjv
    mixes, whose train split is the same book) or "stdlib" (Python standard-library source, which no training
    here uses)."""
    from convert.corpus import code_tokens, text_tokens

    if text not in PPL_TEXTS:
        raise ValueError(f"ppl text must be one of {PPL_TEXTS}, got {text!r}")
    draw = ((lambda s: text_tokens(tok, length, s, "eval")) if text == "kjv" else
            (lambda s: code_tokens(tok, length, s)))
    toks = np.stack([draw(10 ** 7 + 7919 * seed + i) for i in range(n)])
    return toks, np.full((n,), length - PPL_TOKENS, np.int32)


def evaluate(params, cfg, tok, modes: list[Mode], indexers: dict, lengths: list[int], tasks: list[str], n: int,
             seed: int, log=print, done: dict | None = None, on_row=None, ppl_text: str = "kjv") -> list[dict]:
    """Rows of every mode x task x length (plus ppl, on `ppl_prompts`' text `ppl_text`) on the same prompts.

    done: rows of an earlier run of the same configuration keyed by (mode, task, length); those cells are taken
    as they are instead of run again (`--resume`). on_row(row) is called after each row (the CLI saves there)."""
    b = Builder(tok)
    rows: list[dict] = []
    done = done or {}

    def add(row, resumed=False, extra=""):
        rows.append(row)
        if on_row is not None:
            on_row(row)
        log(f"[accuracy] {row['length']:>6} {row['mode']:<26} {row['task']:<18} score {row['score']:8.2f} "
            f"blocks {row['blocks_frac']}{extra} ({'resumed' if resumed else f'{time.time() - t0:.0f}s'})")

    gen = max(max_new_tokens(t) for t in tasks) if tasks else 0
    t0 = time.time()
    for length in lengths:
        max_len = -(-(length + max(gen, PPL_TOKENS)) // 64) * 64
        prompts = {t: [make_prompt(tok, t, length, i, seed, b) for i in range(n)] for t in tasks}
        ppl = ppl_prompts(tok, length, n, seed, ppl_text)
        static = [m for m in modes if m.name != "topk_same_budget"]
        groups: dict = {}
        for m in static:
            groups.setdefault(_prefill_key(m), []).append(m)
        frac_rtp = []

        def inputs(task):
            """(tokens, lengths, steps, teacher-forced tokens or None) of one task's batch at this length."""
            if task == "ppl":
                return ppl[0], ppl[1], PPL_TOKENS, ppl[0][:, length - PPL_TOKENS:]
            return np.stack([p.tokens for p in prompts[task]]), np.full((n,), length, np.int32), max_new_tokens(task), None

        for key, group in groups.items():
            for task in tasks + ["ppl"]:
                toks, lens, steps, forced = inputs(task)
                cache = None
                for m in group:
                    if (m.name, task, length) in done:
                        add(done[(m.name, task, length)], resumed=True)
                    else:
                        ix = indexers.get(m.indexer)
                        out, nll, frac, cache = run_batch(params, cfg, m.sparse, ix, toks, lens, max_len,
                                                          steps, forced, cache)
                        add(_row(m.name, task, length, n, out, nll, frac, prompts, tok, steps))
                    if m.name == "rtpurbo" and rows[-1]["blocks_frac"] is not None:
                        frac_rtp.append(rows[-1]["blocks_frac"])
        topk = [m for m in modes if m.name == "topk_same_budget"]
        if topk and frac_rtp:
            base = next(m for m in modes if m.name == "rtpurbo").sparse
            k = max(1, math.ceil(float(np.mean(frac_rtp)) * -(-length // base.kv_block)))
            m = Mode("topk_same_budget", dataclasses.replace(base, top_p=1.0, max_blocks=k), topk[0].indexer)
            for task in tasks + ["ppl"]:
                if (m.name, task, length) in done:
                    add(done[(m.name, task, length)], resumed=True)
                    continue
                toks, lens, steps, forced = inputs(task)
                ix = indexers.get(m.indexer)
                out, nll, frac, _ = run_batch(params, cfg, m.sparse, ix, toks, lens, max_len, steps, forced)
                add({**_row(m.name, task, length, n, out, nll, frac, prompts, tok, steps), "max_blocks": k},
                    extra=f" k={k}")
    return rows


def earlier_rows(path: str, config: dict, resume: bool, overwrite: bool) -> dict:
    """{(mode, task, length): row} of an earlier run at `path` (JSON) to keep with --resume; {} for a fresh run.

    Refuses to touch an existing file unless resume or overwrite is given, and refuses to resume one written
    with another configuration (naming the keys that differ)."""
    if not os.path.exists(path):
        return {}
    if resume:
        with open(path) as f:
            old = json.load(f)
        have = {**old.get("config", {}), "model": old.get("model"), "device": old.get("device")}
        diff = sorted(k for k in set(config) | set(have) if config.get(k) != have.get(k))
        if diff:
            raise ValueError(f"{path} was written with another configuration ({', '.join(diff)} differ): "
                             f"choose another --out, or --overwrite to replace it")
        return by_cell(old["rows"])
    if not overwrite:
        raise FileExistsError(f"{path} exists: --resume to keep its cells and run the rest, --overwrite to replace "
                              f"it, or another --out")
    return {}


def _row(mode, task, length, n, out, nll, frac, prompts, tok, steps) -> dict:
    if task == "ppl":
        return {"mode": mode, "task": "ppl", "kind": "ppl", "length": length, "n": n,
                "score": float(np.exp(nll.sum() / (n * steps))), "blocks_frac": frac,
                "nll_per_token": [float(x) / steps for x in nll]}
    eos = tok.eos_token_id
    texts = []
    for o in out:
        o = list(o)
        texts.append(tok.decode(o[: o.index(eos)] if eos in o else o))
    scores = [score(t, p.answers) for t, p in zip(texts, prompts[task])]
    return {"mode": mode, "task": task, "kind": TASKS[task], "length": length, "n": n,
            "score": float(np.mean(scores)), "scores": [float(x) for x in scores], "blocks_frac": frac,
            "sample": texts[0][:120]}


def by_cell(rows: list[dict]) -> dict:
    """{(mode, task, length): row} of result rows."""
    return {(r["mode"], r["task"], r["length"]): r for r in rows}


def paired(rows: list[dict], base: str = "full", tasks: tuple[str, ...] = NIAH_TASKS) -> list[dict]:
    """Every mode against `base` on the same prompts, per length: {mode, length, n (prompts), score_diff (mean of
    the per-prompt score differences over `tasks`, points), stderr, ci95 [lo, hi] (normal approximation),
    differing (prompts whose scores differ)} where both modes have per-prompt scores of every task, plus
    {ppl_ratio, ppl_ratio_ci95} where both have per-prompt NLLs (the ratio of perplexities, exp of the mean
    per-prompt NLL difference). Rows of older results without per-prompt values are skipped."""
    at = by_cell(rows)
    return _paired_rows(at, at, [r for r in rows if r["mode"] != base], base, tasks)


def _paired_rows(at: dict, base_at: dict, rows: list[dict], base: str | None, tasks) -> list[dict]:
    """`_paired_cell` for every (mode, length) of `rows` in order, against mode `base` (None: the same mode) of
    `base_at`; cells without per-prompt values left out."""
    out = []
    for mode, length in dict.fromkeys((r["mode"], r["length"]) for r in rows):
        row = _paired_cell(at, mode, base_at, mode if base is None else base, length, tasks)
        if row:
            out.append({"mode": mode, "length": length, **row})
    return out


def _paired_cell(at: dict, mode: str, base_at: dict, base: str, length: int, tasks) -> dict:
    """`paired`'s figures of `mode` (rows `at`, keyed (mode, task, length)) against `base` (rows `base_at`) at one
    length; {} where neither comparison has per-prompt values."""
    row: dict = {}
    pairs = [(at.get((mode, t, length)), base_at.get((base, t, length))) for t in tasks]
    if all(a and b and "scores" in a and "scores" in b and len(a["scores"]) == len(b["scores"]) for a, b in pairs):
        d = np.concatenate([np.subtract(a["scores"], b["scores"]) for a, b in pairs])
        se = float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else float("nan")
        row.update(n=int(d.size), score_diff=float(d.mean()), stderr=se,
                   ci95=[float(d.mean() - 1.96 * se), float(d.mean() + 1.96 * se)], differing=int((d != 0).sum()))
    a, b = at.get((mode, "ppl", length)), base_at.get((base, "ppl", length))
    if a and b and "nll_per_token" in a and "nll_per_token" in b and len(a["nll_per_token"]) == len(b["nll_per_token"]):
        d = np.subtract(a["nll_per_token"], b["nll_per_token"])
        se = float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else float("nan")
        row.update(ppl_ratio=float(np.exp(d.mean())),
                   ppl_ratio_ci95=[float(np.exp(d.mean() - 1.96 * se)), float(np.exp(d.mean() + 1.96 * se))])
    return row


# what makes two runs' prompts the same (`compare_runs`)
SAME_PROMPTS = ("model", "prompts", "seed")


def compare_runs(a: dict, b: dict, tasks: tuple[str, ...] = NIAH_TASKS) -> list[dict]:
    """Two result JSONs (dicts) of the same prompts — same model, prompt count and seed (the prompts are drawn from
    those and the length) — compared mode by mode: `paired`'s figures of run b's mode against run a's same mode,
    for every (mode, length) both hold. Raises naming what differs when the prompts cannot be the same."""
    key = lambda r: {"model": r.get("model"), **{k: r.get("config", {}).get(k) for k in SAME_PROMPTS[1:]}}
    if key(a) != key(b):
        raise ValueError(f"the runs did not score the same prompts: {key(a)} vs {key(b)}")
    return _paired_rows(by_cell(b["rows"]), by_cell(a["rows"]), b["rows"], None, tasks)


def describe_paired(p: dict, against: str = "full") -> str:
    """One log line of a `paired` (or `compare_runs`) row."""
    out = f"[accuracy] {p['length']:>6} {p['mode']:<26} vs {against}:"
    if "score_diff" in p:
        out += f" NIAH {p['score_diff']:+6.2f} points (95% CI {p['ci95'][0]:+.2f} .. {p['ci95'][1]:+.2f}; {p['n']} prompts)"
    if "ppl_ratio" in p:
        out += f" ppl x{p['ppl_ratio']:.4f} ({p['ppl_ratio_ci95'][0]:.4f} .. {p['ppl_ratio_ci95'][1]:.4f})"
    return out


def plot(res: dict, path: str) -> None:
    """Heat map task x length per mode (retrieval and aggregation scores)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["rows"] if r["kind"] != "ppl"]
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    cols = min(4, len(modes))
    fig, axes = plt.subplots(-(-len(modes) // cols), cols, figsize=(3.2 * cols, 0.3 * len(tasks) * -(-len(modes) // cols) + 1.5),
                             squeeze=False)
    for ax, m in zip(axes.flat, modes):
        grid = np.full((len(tasks), len(lengths)), np.nan)
        for r in rows:
            if r["mode"] == m:
                grid[tasks.index(r["task"]), lengths.index(r["length"])] = r["score"]
        ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            ax.text(j, i, "" if np.isnan(v) else f"{v:.0f}", ha="center", va="center", fontsize=6)
        ax.set_title(m, fontsize=8)
        ax.set_xticks(range(len(lengths)), [f"{round(L / 1024)}K" if L >= 1024 else str(L) for L in lengths], fontsize=6)
        ax.set_yticks(range(len(tasks)), tasks if ax in axes[:, 0] else [""] * len(tasks), fontsize=6)
    for ax in list(axes.flat)[len(modes):]:
        ax.axis("off")
    fig.suptitle(f"{res['model']} on {res['device']}: score 0-100 per task x length", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_paired(res: dict, path: str) -> bool:
    """Each mode's paired NIAH difference from full attention (`paired_vs_full`) with its 95% interval, one panel
    per length; False (nothing written) when no row has per-prompt scores."""
    rows = [r for r in res.get("paired_vs_full", []) if "score_diff" in r]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in rows})
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, axes = plt.subplots(1, len(lengths), figsize=(3.2 * len(lengths), 0.28 * len(modes) + 1.4), squeeze=False,
                             sharey=True)
    for ax, length in zip(axes[0], lengths):
        at = {r["mode"]: r for r in rows if r["length"] == length}
        for i, m in enumerate(modes):
            if m in at:
                r = at[m]
                ax.errorbar(r["score_diff"], i, xerr=[[r["score_diff"] - r["ci95"][0]], [r["ci95"][1] - r["score_diff"]]],
                            fmt="o", ms=3, capsize=2)
        ax.axvline(0, color="k", lw=0.6)
        ax.set_title(f"{length} tokens", fontsize=8)
        ax.set_xlabel("NIAH points vs full (95% CI)", fontsize=7)
        ax.set_yticks(range(len(modes)), modes, fontsize=6)
        ax.tick_params(axis="x", labelsize=6)
    fig.suptitle(f"{res['model']} on {res['device']}: paired difference from full attention, same prompts", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    from rtpurbo_jax.checkpoint import load_converted, load_indexer, model_name

    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--converted", help="a converted checkpoint with roles (python -m convert)")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                   help="no run: compare two result files of the same prompts mode by mode (B minus A, paired)")
    p.add_argument("--indexer", action="append", default=[],
                   help="DIR or NAME=DIR of a trained indexer (train.distill's indexer/); the first is the shipped one")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8000])
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--modes", nargs="+", default=None, help="run only these modes")
    p.add_argument("--windows", type=int, nargs="*", default=[], help="extra windows for dense_retrieval_w<W>")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ppl-text", default="kjv", choices=PPL_TEXTS,
                   help="held-out text of the perplexity rows: KJV's eval split (default) or Python standard-library "
                        "source (a domain no training here uses)")
    p.add_argument("--dtype", default=None, help="param dtype (default: as converted)")
    p.add_argument("--out", default=None, help="output prefix (default benchmarks/results/accuracy_<model>_<device>)")
    p.add_argument("--resume", action="store_true",
                   help="keep the cells an interrupted run of the same configuration saved in --out, run the rest")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out JSON")
    args = p.parse_args(argv)
    if args.compare:
        runs = []
        for path in args.compare:
            with open(path) as f:
                runs.append(json.load(f))
        rows = compare_runs(*runs, tasks=tuple(t for t in NIAH_TASKS if t in args.tasks))
        for r in rows:
            print(describe_paired(r, against=os.path.basename(args.compare[0])), flush=True)
        if not rows:
            print("[accuracy] no (mode, length) of both runs has per-prompt values to compare", flush=True)
        return 0
    if not args.converted:
        p.error("--converted is required (or --compare A.json B.json)")
    ckpt = load_converted(args.converted)
    cfg, tok = ckpt.model_config, ckpt.tokenizer()
    params = ckpt.params if args.dtype is None else jax.tree.map(lambda x: jnp.asarray(x, args.dtype), ckpt.params)
    shipped = SparseConfig.from_dict(ckpt.meta["sparse_config"])
    indexers = {}
    for spec in args.indexer:
        name, _, path = spec.rpartition("=")
        indexers[name or "shipped"] = load_indexer(path, cfg)  # its own index_dim (stage 1's --index-dim)
    for name, dim in index_dims(indexers).items():
        check_indexer(cfg, dataclasses.replace(shipped, index_dim=dim), indexers[name])
    for length in args.lengths:
        if length + 64 > cfg.max_position_embeddings:
            raise ValueError(f"--lengths {length} + generated tokens exceed the model's {cfg.max_position_embeddings}")
    modes = with_shared_index_keys(build_modes(shipped, index_dims(indexers), args.windows, args.seed, args.modes),
                                   indexers, shipped.roles_array, cfg.num_kv_heads)
    shared = sorted({m.indexer for m in modes if m.sparse is not None and m.sparse.shared_index_keys})
    device = jax.devices()[0].device_kind
    model = model_name(ckpt.meta, args.converted)
    print(f"[accuracy] {model} on {device}: {len(modes)} modes x {len(args.tasks)} tasks x {args.lengths}, "
          f"{args.prompts} prompts per cell", flush=True)
    out = args.out or f"benchmarks/results/accuracy_{model}_{device.lower().replace(' ', '_')}"
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    config = {**_result(model, device, shipped, args, params, [], shared)["config"], "model": model, "device": device}
    done = earlier_rows(out + ".json", config, args.resume, args.overwrite)
    rows: list[dict] = []

    def save_row(row):  # after every cell, atomically: a cut-off run keeps what it measured and --resume goes on
        rows.append(row)
        write_json(out + ".json", _result(model, device, shipped, args, params, rows, shared))

    evaluate(params, cfg, tok, modes, indexers, args.lengths, args.tasks, args.prompts, args.seed,
             log=lambda s: print(s, flush=True), done=done, on_row=save_row, ppl_text=args.ppl_text)
    res = _result(model, device, shipped, args, params, rows, shared)
    for p in res["paired_vs_full"]:
        print(describe_paired(p), flush=True)
    plot(res, out + ".png")
    paired_png = plot_paired(res, out + "_paired.png")
    print(f"[accuracy] wrote {out}.json / .png" + (" / _paired.png" if paired_png else ""))
    return 0


def _result(model, device, shipped, args, params, rows, shared=()) -> dict:
    """The results JSON; shared: the indexers served from one index key per KV group (`with_shared_index_keys`)."""
    return {"model": model, "device": device, "jax": jax.__version__, "date": datetime.date.today().isoformat(),
           "config": {"shipped_sparse": {k: v for k, v in shipped.to_dict().items() if k != "roles"},
                      "retrieval_heads": int(shipped.roles_array.sum()), "total_heads": int(shipped.roles_array.size),
                      "seqlen_threshold_in_benchmark": 0, "indexers": args.indexer, "prompts": args.prompts,
                      "seed": args.seed, "dtype": str(jnp.dtype(params["embed"].dtype)),
                      **({"shared_index_keys": list(shared)} if shared else {}),
                      **({"ppl_text": args.ppl_text} if args.ppl_text != "kjv" else {})},
           "rows": rows, "paired_vs_full": paired(rows)}


if __name__ == "__main__":
    raise SystemExit(main())
