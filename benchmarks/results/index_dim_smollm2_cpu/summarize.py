"""Stage 1 on SmolLM2-135M with index keys of 4, 8 and 16 dims (issue 17: smaller index keys, measured before any
becomes a default; session 24, this project's 2-core CPU host): per run the held-out selection metrics after 60
steps at 1024 tokens, into summary.json / summary.png (benchmarks.stage1_summary). The runs' own summary.json and
logs are in runs/. Run from the repo root: python benchmarks/results/index_dim_smollm2_cpu/summarize.py"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
from benchmarks.stage1_summary import summarize_stage1  # noqa: E402

D = os.path.dirname(os.path.abspath(__file__))
META = {"model": "SmolLM2-135M-Instruct (bundled GGUF), bf16, calibrated 4 x 2048: 41 of 270 heads retrieval",
        "device": "CPU (2 cores)", "jax": "0.11.2", "date": "2026-12-07",
        "command": "python -m train.distill --model CONVERTED --seq-len 1024 --steps 60 --eval-passkey 0 "
                   "--eval-lengths 2048 --index-dim {4,8,16}  (defaults otherwise: pca init, lr 1e-3, kjv with 1 "
                   "retrieval event per 1K tokens, block/longrange loss, one key map per head)",
        "code": "4 and 8 dims at fc4d629, 16 dims at 101e7b3, one after the other (no stage-1 code changed between them or since session 23)",
        "not_measured": "the accuracy suite through serving (needs a GPU), longer windows or training, a second seed"}


def main():
    summarize_stage1(D, {"16 dims (shipped)": "dim16", "8 dims": "dim8", "4 dims": "dim4"}, META,
                     "SmolLM2 stage 1 (60 steps at 1024 tokens, CPU): index keys of 16, 8 and 4 dims")


if __name__ == "__main__":
    main()
