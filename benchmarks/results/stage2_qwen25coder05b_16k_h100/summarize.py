"""Summary of the session-21 Qwen2.5-Coder-0.5B stage-2 run on 16K windows (H100): per length (16K, 32K) and mode
(full, rtpurbo) the NIAH mean, perplexity and blocks_frac before (L*/acc_stage1.json) and after stage 2
(L*/acc_stage2.json), each paired against full attention of the same model and against itself before
(`benchmarks.stage2_summary.summarize_runs`), into summary.json / summary.png.
Run from the repo root: python benchmarks/results/stage2_qwen25coder05b_16k_h100/summarize.py"""
import json
import os

from benchmarks.stage2_summary import summarize_runs

D = os.path.dirname(os.path.abspath(__file__))

if __name__ == "__main__":
    summarize_runs(D, {"before": "L{L}/acc_stage1.json", "after_16k_gbs8": "L{L}/acc_stage2.json"}, (16000, 32000),
                   json.load(open(os.path.join(D, "stage2", "summary.json"))), ("full", "rtpurbo"),
                   "Qwen2.5-Coder-0.5B on an H100: before / after stage 2 on 16K task windows "
                   "(global batch 8 x 40 steps, answer rows)")
