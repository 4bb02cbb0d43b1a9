"""`python -m benchmarks.stage2_summary OUTDIR`: merge run_stage2.sh's two accuracy files (the model before and
after stage 2, same prompts) into OUTDIR/accuracy_stage2.json (modes of the second get "_stage2"), print the
retrieval mean / perplexity / blocks_frac per mode and length, and draw them as OUTDIR/accuracy_stage2.png.
`python -m benchmarks.stage2_summary --runs FOLDER`: several runs' suites side by side, as FOLDER/runs.json lists
them (`summarize_folder`), each cell paired against full attention of the same model and against the same mode before
stage 2 (`runs_table` / `plot_runs` / `summarize_runs`), into FOLDER/summary.{json,png}."""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict


def merge(out: str) -> dict:
    a, b = (json.load(open(os.path.join(out, f"{n}.json"))) for n in ("acc_stage1", "acc_stage2"))
    for r in b["rows"]:
        r["mode"] += "_stage2"
    merged = {**a, "rows": a["rows"] + b["rows"], "config_stage2": b["config"]}
    summary = os.path.join(out, "stage2", "summary.json")
    if os.path.exists(summary):
        merged["stage2"] = json.load(open(summary))
    return merged


def table(rows: list[dict]) -> dict:
    """{(mode, length): {"retrieval": mean score, "ppl": ..., "blocks_frac": mean over retrieval rows}}."""
    cells = defaultdict(lambda: {"scores": [], "blocks": []})
    for r in rows:
        c = cells[(r["mode"], r["length"])]
        if r["kind"] == "ppl":
            c["ppl"] = r["score"]
        elif r["kind"] == "retrieval":
            c["scores"].append(r["score"])
            if r.get("blocks_frac") is not None:
                c["blocks"].append(r["blocks_frac"])
    return {k: {"retrieval": sum(c["scores"]) / len(c["scores"]), "ppl": c.get("ppl"),
                "blocks_frac": sum(c["blocks"]) / len(c["blocks"]) if c["blocks"] else None}
            for k, c in cells.items() if c["scores"]}


def plot(t: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({n for _, n in t})
    modes = sorted({m for m, _ in t}, key=lambda m: (m.endswith("_stage2"), m))
    base = sorted({m.removesuffix("_stage2") for m in modes})
    colour = {m: f"C{i}" for i, m in enumerate(base)}
    fig, ax = plt.subplots(figsize=(9, 3.4))
    w = 0.8 / len(modes)
    for i, m in enumerate(modes):
        ys = [t.get((m, n), {}).get("retrieval", 0.0) for n in lengths]
        ax.bar([j + i * w for j in range(len(lengths))], ys, w, label=m, color=colour[m.removesuffix("_stage2")],
               hatch="//" if m.endswith("_stage2") else None, edgecolor="white")
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(lengths))], [str(n) for n in lengths])
    ax.set(xlabel="prompt length (tokens)", ylabel="retrieval mean (0-100)",
           title="before (plain) / after stage 2 (hatched)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def runs_table(runs: dict, base: str = "before") -> list[dict]:
    """runs: {run name: {length: accuracy result JSON (dict)}}, one run named `base` (the model before stage 2,
    the same prompts). Rows per run, length and mode: NIAH mean, perplexity, blocks_frac; the paired difference
    from full attention of the same run (points, 95% interval, perplexity ratio) and from the same mode of
    `base` (`benchmarks.accuracy.compare_runs`), and from full attention of `base` (the dense model before stage 2:
    the model a sparse one replaces)."""
    from benchmarks.accuracy import compare_runs

    def as_full(res: dict, mode: str) -> dict:  # res's full-attention rows, renamed to `mode` for pairing
        return {**res, "rows": [{**r, "mode": mode} for r in res["rows"] if r["mode"] == "full"]}

    rows = []
    for run, by_length in runs.items():
        for length, res in by_length.items():
            vs_full = {p["mode"]: p for p in res["paired_vs_full"]}
            vs_base = {} if run == base else {p["mode"]: p for p in compare_runs(runs[base][length], res)}
            vs_dense = {}
            for m in {r["mode"] for r in res["rows"]} - ({"full"} if run == base else set()):
                vs_dense.update({p["mode"]: p for p in compare_runs(as_full(runs[base][length], m), res)
                                 if p["mode"] == m})
            for (mode, n), cell in table(res["rows"]).items():
                pf, pb, pd = vs_full.get(mode, {}), vs_base.get(mode, {}), vs_dense.get(mode, {})
                rows.append({"run": run, "length": n, "mode": mode, "niah_mean": round(cell["retrieval"], 2),
                             "ppl": round(cell["ppl"], 3),
                             "blocks_frac": cell["blocks_frac"] and round(cell["blocks_frac"], 4),
                             "vs_full_points": pf.get("score_diff"), "vs_full_ci95": pf.get("ci95"),
                             "vs_full_ppl_ratio": pf.get("ppl_ratio"), "vs_before_points": pb.get("score_diff"),
                             "vs_before_ci95": pb.get("ci95"), "vs_before_ppl_ratio": pb.get("ppl_ratio"),
                             "vs_dense_before_points": pd.get("score_diff"), "vs_dense_before_ci95": pd.get("ci95"),
                             "vs_dense_before_ppl_ratio": pd.get("ppl_ratio")})
    return rows


def plot_runs(rows: list[dict], modes: tuple[str, ...], title: str, path: str, ylim=(60, 95)) -> None:
    """`runs_table`'s NIAH means as bars, one panel per length, modes grouped, one colour per run (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in rows})
    runs = list(dict.fromkeys(r["run"] for r in rows))
    step = len(runs) + 1
    fig, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 3.6), squeeze=False)
    for ax, n in zip(axes[0], lengths):
        for i, mode in enumerate(modes):
            for j, run in enumerate(runs):
                r = [x for x in rows if x["run"] == run and x["mode"] == mode and x["length"] == n]
                if r:
                    ax.bar(i * step + j, r[0]["niah_mean"], color=f"C{j}", label=run if i == 0 else None)
        ax.set_xticks([i * step + (len(runs) - 1) / 2 for i in range(len(modes))], list(modes), fontsize=8)
        ax.set_ylim(*ylim)
        ax.set_title(f"{n} tokens: NIAH mean (5 tasks x 20 prompts)", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def summarize_runs(folder: str, runs: dict, lengths, stage2: dict, modes: tuple[str, ...], title: str,
                   model: str = "qwen2.5-coder-0.5b-instruct", device: str = "NVIDIA H100 80GB HBM3",
                   ylim=(60, 95)) -> list[dict]:
    """A results folder's summary: runs {name: path of its accuracy JSON relative to `folder`, with {L} for the
    length} read at each of `lengths`, `runs_table` over them (the first run is the "before" every other run is
    paired with) -> folder/summary.json (with `stage2`: the training summaries) and folder/summary.png
    (`plot_runs` of `modes`); each row printed. The rows."""
    loaded = {run: {L: json.load(open(os.path.join(folder, path.format(L=L)))) for L in lengths}
              for run, path in runs.items()}
    rows = runs_table(loaded, base=next(iter(runs)))
    with open(os.path.join(folder, "summary.json"), "w") as f:
        json.dump({"model": model, "device": device, "rows": rows, "stage2": stage2}, f, indent=1)
    plot_runs(rows, modes, title, os.path.join(folder, "summary.png"), ylim)
    for r in rows:
        print(r["run"], r["length"], r["mode"], r["niah_mean"], r["ppl"], r["blocks_frac"], r["vs_full_points"],
              r["vs_full_ci95"], r["vs_full_ppl_ratio"], r["vs_before_points"], r["vs_before_ci95"],
              r["vs_before_ppl_ratio"], r["vs_dense_before_points"], r["vs_dense_before_ci95"])
    return rows


def summarize_folder(folder: str) -> list[dict]:
    """`summarize_runs` as folder/runs.json describes it: {"runs": {name: accuracy JSON path with {L}},
    "lengths": [...], "modes": [...], "title": str, "stage2": the training summary's path, or {name: path},
    optional "ylim": [lo, hi]} (paths relative to `folder`; the first run is the "before"). The rows."""
    spec = json.load(open(os.path.join(folder, "runs.json")))
    s2 = spec["stage2"]
    load = lambda p: json.load(open(os.path.join(folder, p)))  # noqa: E731
    stage2 = load(s2) if isinstance(s2, str) else {k: load(p) for k, p in s2.items()}
    return summarize_runs(folder, spec["runs"], tuple(spec["lengths"]), stage2, tuple(spec["modes"]), spec["title"],
                          ylim=tuple(spec.get("ylim", (60, 95))))


def main(argv=None) -> int:
    argv = argv or sys.argv[1:]
    usage = "usage: python -m benchmarks.stage2_summary OUTDIR | --runs FOLDER"
    if len(argv) != (2 if argv[:1] == ["--runs"] else 1):
        print(usage, file=sys.stderr)
        return 2
    if argv[0] == "--runs":
        if not os.path.exists(os.path.join(argv[1], "runs.json")):
            print(f"{argv[1]} has no runs.json (the runs to summarize); {usage}", file=sys.stderr)
            return 2
        summarize_folder(argv[1])
        return 0
    out = argv[0]
    merged = merge(out)
    with open(os.path.join(out, "accuracy_stage2.json"), "w") as f:
        json.dump(merged, f, indent=1)
    t = table(merged["rows"])
    for (m, n), c in sorted(t.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"{n:6d} {m:26s} retrieval {c['retrieval']:6.2f}  ppl {c['ppl']}  blocks_frac {c['blocks_frac']}")
    plot(t, os.path.join(out, "accuracy_stage2.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
