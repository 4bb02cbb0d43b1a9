"""Summary of the session-23 Qwen2.5-Coder-0.5B stage-2 run on 32K windows of --data tasks+kjv (H100): per length
(16K, 32K) and mode the NIAH mean, perplexity and blocks_frac before stage 2 (L*/acc_stage1.json, this run; with the
--share-index-keys indexer as rtpurbo@shared), after session 22's run on 16K windows
(../stage2_qwen25coder05b_16k_mix/L*/acc_stage2.json: same conversion recipe, stage 1 recipe, stage-2 recipe and
prompts; only the window differs) and after this run (L*/acc_stage2.json), each paired against full attention of the
same model and against this run's "before" (`benchmarks.stage2_summary.summarize_runs`), into summary.json / .png.
Run from the repo root: python benchmarks/results/stage2_qwen25coder05b_32k_mix/summarize.py"""
import json
import os

from benchmarks.stage2_summary import summarize_runs

D = os.path.dirname(os.path.abspath(__file__))

if __name__ == "__main__":
    summarize_runs(D, {"before": "L{L}/acc_stage1.json",
                       "after_16k_windows": "../stage2_qwen25coder05b_16k_mix/L{L}/acc_stage2.json",
                       "after_32k_windows": "L{L}/acc_stage2.json"}, (16000, 32000),
                   json.load(open(os.path.join(D, "stage2", "summary.json"))), ("full", "rtpurbo"),
                   "Qwen2.5-Coder-0.5B on an H100: before / after stage 2 on --data tasks+kjv "
                   "(global batch 8 x 40 steps): 16K windows (session 22) vs 32K windows")
