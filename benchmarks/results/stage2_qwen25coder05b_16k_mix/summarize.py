"""Summary of the session-22 Qwen2.5-Coder-0.5B stage-2 run on 16K windows of --data tasks+kjv (H100): per length
(16K, 32K) and mode (full, rtpurbo) the NIAH mean, perplexity and blocks_frac before stage 2 (L*/acc_stage1.json, this
run), after session 21's tasks-only run (../stage2_qwen25coder05b_16k_h100/L*/acc_stage2.json: same conversion, stage 1,
recipe and prompts, only --data differs) and after this run (L*/acc_stage2.json), each paired against full attention of
the same model and against this run's "before" (`benchmarks.stage2_summary.runs_table`), into summary.json / .png.
Run from the repo root: python benchmarks/results/stage2_qwen25coder05b_16k_mix/summarize.py"""
import json
import os

from benchmarks.stage2_summary import plot_runs, runs_table

D = os.path.dirname(os.path.abspath(__file__))
RUNS = {"before": "L{L}/acc_stage1.json", "after_tasks": "../stage2_qwen25coder05b_16k_h100/L{L}/acc_stage2.json",
        "after_tasks+kjv": "L{L}/acc_stage2.json"}
LENGTHS = (16000, 32000)


def main():
    runs = {run: {L: json.load(open(os.path.join(D, path.format(L=L)))) for L in LENGTHS} for run, path in RUNS.items()}
    rows = runs_table(runs)
    stage2 = json.load(open(os.path.join(D, "stage2", "summary.json")))
    json.dump({"model": "qwen2.5-coder-0.5b-instruct", "device": "NVIDIA H100 80GB HBM3", "rows": rows, "stage2": stage2},
              open(os.path.join(D, "summary.json"), "w"), indent=1)
    plot_runs(rows, ("full", "rtpurbo"), "Qwen2.5-Coder-0.5B on an H100: before / after stage 2 on 16K windows "
              "(global batch 8 x 40 steps): --data tasks (session 21) vs tasks+kjv", os.path.join(D, "summary.png"))
    for r in rows:
        print(r["run"], r["length"], r["mode"], r["niah_mean"], r["ppl"], r["blocks_frac"], r["vs_full_points"],
              r["vs_full_ci95"], r["vs_full_ppl_ratio"], r["vs_before_points"], r["vs_before_ci95"], r["vs_before_ppl_ratio"])


if __name__ == "__main__":
    main()
