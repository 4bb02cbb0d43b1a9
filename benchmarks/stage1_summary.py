"""Stage-1 runs side by side: `summarize_stage1(folder, runs, meta, title)` reads each run's `summary.json`
(`python -m train.distill` with `--eval-lengths 2048`, windows of 1024 tokens) and writes the held-out selection
metrics after training — needle-block hit and blocks visited on retrieval rows of eval-split prose at 1024 and 2048
tokens and on the suite's task prompts at 1024, beside the oracle's blocks — into `folder/summary.json` (meta's
fields first) and a bar chart `folder/summary.png`. The results folders' summarize.py scripts call it."""

from __future__ import annotations

import json
import os

METRICS = [("held-out rows 1024: needle-block hit", "after", "heldout_top_hit"),
           ("held-out rows 1024: blocks", "after", "heldout_selected_frac"),
           ("task prompts 1024: needle-block hit", "after", "heldout_tasks_top_hit"),
           ("task prompts 1024: blocks", "after", "heldout_tasks_selected_frac"),
           ("held-out rows 2048: needle-block hit", "2048", "top_hit"),
           ("held-out rows 2048: blocks", "2048", "selected_frac")]


def summarize_stage1(folder: str, runs: dict[str, str], meta: dict, title: str) -> list[dict]:
    """runs: {label: run folder under folder/runs}. Returns the rows written."""
    rows = []
    for label, name in runs.items():
        s = json.load(open(os.path.join(folder, "runs", name, "summary.json")))
        get = lambda where, k: s["heldout_by_length"]["2048"][k] if where == "2048" else s[where][k]
        rows.append({"run": label, "loss_before": s["before"]["loss"], "loss_after": s["after"]["loss"],
                     **{m: round(get(w, k), 4) for m, w, k in METRICS},
                     "oracle_blocks_1024": round(s["after"]["heldout_oracle_frac"], 4),
                     "oracle_blocks_tasks_1024": round(s["after"]["heldout_tasks_oracle_frac"], 4),
                     "oracle_blocks_2048": round(s["heldout_by_length"]["2048"]["oracle_frac"], 4)})
    with open(os.path.join(folder, "summary.json"), "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=1)
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
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "summary.png"), dpi=110)
    for r in rows:
        print(r)
    return rows
