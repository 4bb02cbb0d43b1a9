"""Summary of the session-20 Qwen2.5-Coder-0.5B stage-2 runs (H100): per length and mode, the NIAH mean, perplexity
and blocks_frac before stage 2 (gbs2/L*/acc_stage1.json) and after each run (gbs2: global batch 2, 250 steps;
gbs8: global batch 8, 80 steps), each mode paired against full attention of the same model and against itself
before stage 2 (`benchmarks.stage2_summary.summarize_runs`), into summary.json / summary.png.
Run from the repo root: python benchmarks/results/stage2_qwen25coder05b_h100/summarize.py"""
import json
import os

from benchmarks.stage2_summary import summarize_runs

D = os.path.dirname(os.path.abspath(__file__))

if __name__ == "__main__":
    summarize_runs(D, {"before": "gbs2/L{L}/acc_stage1.json", "after_gbs2": "gbs2/L{L}/acc_stage2.json",
                       "after_gbs8": "gbs8/L{L}/acc_stage2.json"}, (8000, 16000),
                   {run: json.load(open(os.path.join(D, run, "stage2", "summary.json"))) for run in ("gbs2", "gbs8")},
                   ("full", "dense_retrieval", "rtpurbo"),
                   "Qwen2.5-Coder-0.5B on an H100: before / after stage 2 (global batch 2 x 250 steps; 8 x 80)")
