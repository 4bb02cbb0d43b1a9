"""`python -m benchmarks.stage2_summary OUTDIR`: merge run_stage2.sh's two accuracy files (the model before and
after stage 2, same prompts) into OUTDIR/accuracy_stage2.json (modes of the second get "_stage2"), print the
retrieval mean / perplexity / blocks_frac per mode and length, and draw them as OUTDIR/accuracy_stage2.png."""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict


def merge(out: str) -> dict:
    a, b = (json.load(open(os.path.join(out, f"{n}.json"))) for n in ("acc_stage1", "acc_stage2"))
    for r in b["rows"]:
        r["mode"] += "_stage2"
    merged = {**a, "rows": a["rows"] + b["rows"], "config_stage2": b["config"]}
    summary = os.path.join(out, "stage2", "summary.json")
    if os.path.exists(summary):
        merged["stage2"] = json.load(open(summary))
    return merged


def table(rows: list[dict]) -> dict:
    """{(mode, length): {"retrieval": mean score, "ppl": ..., "blocks_frac": mean over retrieval rows}}."""
    cells = defaultdict(lambda: {"scores": [], "blocks": []})
    for r in rows:
        c = cells[(r["mode"], r["length"])]
        if r["kind"] == "ppl":
            c["ppl"] = r["score"]
        elif r["kind"] == "retrieval":
            c["scores"].append(r["score"])
            if r.get("blocks_frac") is not None:
                c["blocks"].append(r["blocks_frac"])
    return {k: {"retrieval": sum(c["scores"]) / len(c["scores"]), "ppl": c.get("ppl"),
                "blocks_frac": sum(c["blocks"]) / len(c["blocks"]) if c["blocks"] else None}
            for k, c in cells.items() if c["scores"]}


def plot(t: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({n for _, n in t})
    modes = sorted({m for m, _ in t}, key=lambda m: (m.endswith("_stage2"), m))
    base = sorted({m.removesuffix("_stage2") for m in modes})
    colour = {m: f"C{i}" for i, m in enumerate(base)}
    fig, ax = plt.subplots(figsize=(9, 3.4))
    w = 0.8 / len(modes)
    for i, m in enumerate(modes):
        ys = [t.get((m, n), {}).get("retrieval", 0.0) for n in lengths]
        ax.bar([j + i * w for j in range(len(lengths))], ys, w, label=m, color=colour[m.removesuffix("_stage2")],
               hatch="//" if m.endswith("_stage2") else None, edgecolor="white")
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(lengths))], [str(n) for n in lengths])
    ax.set(xlabel="prompt length (tokens)", ylabel="retrieval mean (0-100)",
           title="before (plain) / after stage 2 (hatched)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    out = (argv or sys.argv[1:])[0]
    merged = merge(out)
    with open(os.path.join(out, "accuracy_stage2.json"), "w") as f:
        json.dump(merged, f, indent=1)
    t = table(merged["rows"])
    for (m, n), c in sorted(t.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"{n:6d} {m:26s} retrieval {c['retrieval']:6.2f}  ppl {c['ppl']}  blocks_frac {c['blocks_frac']}")
    plot(t, os.path.join(out, "accuracy_stage2.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
