"""Stage 1 on SmolLM2-135M with and without --share-index-keys (session 22, this project's 2-core CPU host): per run
the held-out selection metrics after 60 steps at 1024 tokens (retrieval rows of eval-split prose at 1024 and 2048
tokens, the suite's task prompts at 1024), into summary.json / summary.png. The runs' own summary.json and logs are
in runs/. Run from the repo root: python benchmarks/results/share_index_keys_smollm2_cpu/summarize.py"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
from benchmarks.stage1_summary import summarize_stage1  # noqa: E402

D = os.path.dirname(os.path.abspath(__file__))
RUNS = {"own key map per head (41 maps)": "own", "shared per KV group (25 maps)": "shared",
        "shared, first head's PCA basis copied (superseded init)": "shared_firstinit"}
META = {"model": "SmolLM2-135M-Instruct (bundled GGUF), bf16, calibrated 4 x 2048: 41 of 270 heads retrieval "
                 "in 25 (layer, KV head) groups",
        "device": "CPU (2 cores)", "jax": "0.11.2", "date": "2026-12-07",
        "command": "python -m train.distill --model CONVERTED --seq-len 1024 --steps 60 --eval-passkey 0 "
                   "--eval-lengths 2048 [--share-index-keys]  (defaults otherwise: pca init, lr 1e-3, "
                   "kjv with 1 retrieval event per 1K tokens, block/longrange loss)",
        "code": "the per-head and superseded-init runs at 65095e7, the shared run at 25abb4f (the group PCA init); "
                "the per-head path is the same in both",
        "not_measured": "the accuracy suite through serving (needs a GPU), longer windows, a second seed, a "
                        "kv-granularity model; serving still stores one index key per head (no bytes saved yet)"}


def main():
    summarize_stage1(D, RUNS, META, "SmolLM2 stage 1 (60 steps at 1024 tokens, CPU): one key map per head vs one "
                                    "per KV group")

if __name__ == "__main__":
    main()
