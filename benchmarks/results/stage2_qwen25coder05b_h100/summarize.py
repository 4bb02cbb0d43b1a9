"""Summary of the session-20 Qwen2.5-Coder-0.5B stage-2 runs (H100): per length and mode, the NIAH mean, perplexity
and blocks_frac before stage 2 (gbs2/L*/acc_stage1.json) and after each run (gbs2: global batch 2, 250 steps;
gbs8: global batch 8, 80 steps), each mode paired against full attention of the same model and against itself
before stage 2 (`benchmarks.accuracy.paired` / `compare_runs`), into summary.json / summary.png.
Run from the repo root: python benchmarks/results/stage2_qwen25coder05b_h100/summarize.py"""
import json
import os

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

from benchmarks.accuracy import compare_runs
from benchmarks.stage2_summary import table

D = os.path.dirname(os.path.abspath(__file__))
RUNS = {"before": "gbs2/L{L}/acc_stage1.json", "after_gbs2": "gbs2/L{L}/acc_stage2.json",
        "after_gbs8": "gbs8/L{L}/acc_stage2.json"}
LENGTHS = (8000, 16000)


def main():
    load = lambda run, L: json.load(open(os.path.join(D, RUNS[run].format(L=L))))
    rows = []
    for L in LENGTHS:
        before = load("before", L)
        for run in RUNS:
            res = load(run, L)
            vs_full = {p["mode"]: p for p in res["paired_vs_full"]}
            vs_before = {} if run == "before" else {p["mode"]: p for p in compare_runs(before, res)}
            for (mode, length), cell in table(res["rows"]).items():
                pf, pb = vs_full.get(mode, {}), vs_before.get(mode, {})
                rows.append({"run": run, "length": length, "mode": mode, "niah_mean": round(cell["retrieval"], 2),
                             "ppl": round(cell["ppl"], 3), "blocks_frac": cell["blocks_frac"] and round(cell["blocks_frac"], 4),
                             "vs_full_points": pf.get("score_diff"), "vs_full_ci95": pf.get("ci95"),
                             "vs_full_ppl_ratio": pf.get("ppl_ratio"), "vs_before_points": pb.get("score_diff"),
                             "vs_before_ci95": pb.get("ci95"), "vs_before_ppl_ratio": pb.get("ppl_ratio")})
    stage2 = {run: json.load(open(os.path.join(D, run, "stage2", "summary.json"))) for run in ("gbs2", "gbs8")}
    json.dump({"model": "qwen2.5-coder-0.5b-instruct", "device": "NVIDIA H100 80GB HBM3", "rows": rows, "stage2": stage2},
              open(os.path.join(D, "summary.json"), "w"), indent=1)
    fig, axes = plt.subplots(1, len(LENGTHS), figsize=(10, 3.6), squeeze=False)
    for ax, L in zip(axes[0], LENGTHS):
        for i, mode in enumerate(("full", "dense_retrieval", "rtpurbo")):
            for j, run in enumerate(RUNS):
                r = [x for x in rows if x["run"] == run and x["mode"] == mode and x["length"] == L]
                if r:
                    ax.bar(i * 4 + j, r[0]["niah_mean"], color=f"C{j}", label=run if i == 0 else None)
        ax.set_xticks([1, 5, 9], ["full", "dense_retrieval", "rtpurbo"], fontsize=8)
        ax.set_ylim(60, 95); ax.set_title(f"{L} tokens: NIAH mean (5 tasks x 20 prompts)", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("Qwen2.5-Coder-0.5B on an H100: before / after stage 2 (global batch 2 x 250 steps; 8 x 80)", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(D, "summary.png"), dpi=110)
    for r in rows:
        print(r["run"], r["length"], r["mode"], r["niah_mean"], r["ppl"], r["blocks_frac"], r["vs_full_points"], r["vs_before_points"])


if __name__ == "__main__":
    main()
