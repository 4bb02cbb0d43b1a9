"""Stage 1 on SmolLM2-135M with and without --share-index-keys (session 22, this project's 2-core CPU host): per run
the held-out selection metrics after 60 steps at 1024 tokens (retrieval rows of eval-split prose at 1024 and 2048
tokens, the suite's task prompts at 1024), into summary.json / summary.png. The runs' own summary.json and logs are
in runs/. Run from the repo root: python benchmarks/results/share_index_keys_smollm2_cpu/summarize.py"""
import json
import os

D = os.path.dirname(os.path.abspath(__file__))
RUNS = {"own key map per head (41 maps)": "own", "shared per KV group (25 maps)": "shared",
        "shared, first head's PCA basis copied (superseded init)": "shared_firstinit"}
METRICS = [("held-out rows 1024: needle-block hit", "after", "heldout_top_hit"),
           ("held-out rows 1024: blocks", "after", "heldout_selected_frac"),
           ("task prompts 1024: needle-block hit", "after", "heldout_tasks_top_hit"),
           ("task prompts 1024: blocks", "after", "heldout_tasks_selected_frac"),
           ("held-out rows 2048: needle-block hit", "2048", "top_hit"),
           ("held-out rows 2048: blocks", "2048", "selected_frac")]


def main():
    rows = []
    for label, name in RUNS.items():
        s = json.load(open(os.path.join(D, "runs", name, "summary.json")))
        get = lambda where, k: s["heldout_by_length"]["2048"][k] if where == "2048" else s[where][k]
        rows.append({"run": label, "loss_before": s["before"]["loss"], "loss_after": s["after"]["loss"],
                     **{m: round(get(w, k), 4) for m, w, k in METRICS},
                     "oracle_blocks_1024": round(s["after"]["heldout_oracle_frac"], 4),
                     "oracle_blocks_tasks_1024": round(s["after"]["heldout_tasks_oracle_frac"], 4),
                     "oracle_blocks_2048": round(s["heldout_by_length"]["2048"]["oracle_frac"], 4)})
    json.dump({"model": "SmolLM2-135M-Instruct (bundled GGUF), bf16, calibrated 4 x 2048: 41 of 270 heads retrieval "
                        "in 25 (layer, KV head) groups",
               "device": "CPU (2 cores)", "jax": "0.11.2", "date": "2026-12-07",
               "command": "python -m train.distill --model CONVERTED --seq-len 1024 --steps 60 --eval-passkey 0 "
                          "--eval-lengths 2048 [--share-index-keys]  (defaults otherwise: pca init, lr 1e-3, "
                          "kjv with 1 retrieval event per 1K tokens, block/longrange loss)",
               "code": "the per-head and superseded-init runs at 65095e7, the shared run at 25abb4f (the group PCA init); "
                       "the per-head path is the same in both",
               "not_measured": "the accuracy suite through serving (needs a GPU), longer windows, a second seed, a "
                               "kv-granularity model; serving still stores one index key per head (no bytes saved yet)",
               "rows": rows}, open(os.path.join(D, "summary.json"), "w"), indent=1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3.8))
    w = 0.8 / len(rows)
    for i, r in enumerate(rows):
        ax.bar([j + i * w for j in range(len(METRICS))], [r[m] for m, _, _ in METRICS], w, label=r["run"])
    ax.set_xticks([j + w * (len(rows) - 1) / 2 for j in range(len(METRICS))], [m for m, _, _ in METRICS],
                  fontsize=7, rotation=12)
    ax.set_ylim(0, 1)
    ax.set_title("SmolLM2 stage 1 (60 steps at 1024 tokens, CPU): one key map per head vs one per KV group",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(D, "summary.png"), dpi=110)
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
