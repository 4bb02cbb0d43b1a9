"""Summary of the session-21 Qwen2.5-Coder-0.5B stage-2 run on 16K windows (H100): per length (16K, 32K) and mode
(full, rtpurbo) the NIAH mean, perplexity and blocks_frac before (L*/acc_stage1.json) and after stage 2
(L*/acc_stage2.json), each paired against full attention of the same model and against itself before
(`benchmarks.stage2_summary.runs_table`), into summary.json / summary.png.
Run from the repo root: python benchmarks/results/stage2_qwen25coder05b_16k_h100/summarize.py"""
import json
import os

from benchmarks.stage2_summary import plot_runs, runs_table

D = os.path.dirname(os.path.abspath(__file__))
RUNS = {"before": "L{L}/acc_stage1.json", "after_16k_gbs8": "L{L}/acc_stage2.json"}
LENGTHS = (16000, 32000)


def main():
    runs = {run: {L: json.load(open(os.path.join(D, path.format(L=L)))) for L in LENGTHS} for run, path in RUNS.items()}
    rows = runs_table(runs)
    stage2 = json.load(open(os.path.join(D, "stage2", "summary.json")))
    json.dump({"model": "qwen2.5-coder-0.5b-instruct", "device": "NVIDIA H100 80GB HBM3", "rows": rows, "stage2": stage2},
              open(os.path.join(D, "summary.json"), "w"), indent=1)
    plot_runs(rows, ("full", "rtpurbo"), "Qwen2.5-Coder-0.5B on an H100: before / after stage 2 on 16K task windows "
              "(global batch 8 x 40 steps, answer rows)", os.path.join(D, "summary.png"))
    for r in rows:
        print(r["run"], r["length"], r["mode"], r["niah_mean"], r["ppl"], r["blocks_frac"], r["vs_full_points"],
              r["vs_before_points"], r["vs_before_ci95"])


if __name__ == "__main__":
    main()
