"""Summary of the session-18 stage-1 recipe runs (H200): NIAH mean and blocks_frac per (indexer recipe, length) from
the three pipelines' accuracy JSONs, plus each stage-1 run's held-out needle-block hit, into summary.json / .png.
Run from the repo root: python benchmarks/results/stage1_recipes_smollm2/summarize.py"""
import collections
import json
import os

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

D = os.path.dirname(os.path.abspath(__file__))
# (pipeline dir, mode in its suite) -> recipe name
RECIPES = {("run1", "full"): "full attention", ("run1", "dense_retrieval"): "dense retrieval heads",
           ("run1", "rtpurbo"): "shipped (prose+events), seed 0", ("run3", "rtpurbo@base_seed1"): "shipped, seed 1",
           ("run1", "rtpurbo@tasks"): "tasks, seed 0", ("run3", "rtpurbo"): "tasks, seed 1",
           ("run1", "rtpurbo@mix"): "shipped + length mix", ("run1", "rtpurbo@tasks_mix"): "tasks + length mix"}
STAGE1 = {"shipped (prose+events), seed 0": "run1/run/base", "shipped, seed 1": "run3/run/base_seed1",
          "tasks, seed 0": "run1/run/tasks", "tasks, seed 1": "run3/run/tasks_seed1", "shipped + length mix": "run1/run/mix",
          "tasks + length mix": "run1/run/tasks_mix", "tasks, index_dim 32": "run2/run/tasks_d32",
          "tasks, index_dim 64": "run2/run/tasks_d64", "tasks, 400 steps": "run2/run/tasks_400"}

rows = []
for run in ("run1", "run2", "run3"):
    for length in (1024, 4096, 8000):
        p = os.path.join(D, run, "run", f"acc_{length}.json")
        if not os.path.exists(p):
            continue
        res = json.load(open(p))
        score, frac, ppl = collections.defaultdict(list), collections.defaultdict(list), {}
        for r in res["rows"]:
            if r["task"] == "ppl":
                ppl[r["mode"]] = r["score"]
            else:
                score[r["mode"]].append(r["score"])
                frac[r["mode"]].append(r["blocks_frac"])
        for mode, s in score.items():
            name = RECIPES.get((run, mode))
            if name is None or len(s) != 5:
                continue
            f = None if frac[mode][0] is None else sum(frac[mode]) / len(frac[mode])
            rows.append({"recipe": name, "pipeline": run, "mode": mode, "length": length, "niah_mean": sum(s) / 5,
                         "niah_tasks": s, "blocks_frac": f, "ppl": ppl.get(mode), "device": res.get("device")})
heldout = {}
for name, path in STAGE1.items():
    s = json.load(open(os.path.join(D, path, "summary.json")))
    heldout[name] = {k: v["top_hit"] for k, v in s.get("heldout_by_length", {}).items()}
json.dump({"what": __doc__, "rows": rows, "heldout_needle_block_hit": heldout}, open(os.path.join(D, "summary.json"), "w"),
          indent=1)

fig, ax = plt.subplots(figsize=(7, 4.2))
for name in dict.fromkeys(r["recipe"] for r in rows):
    pts = sorted((r["length"], r["niah_mean"]) for r in rows if r["recipe"] == name)
    style = "k--" if name == "full attention" else ("k:" if name.startswith("dense") else "o-")
    ax.plot([x for x, _ in pts], [y for _, y in pts], style, label=name)
ax.set_xscale("log", base=2)
ax.set_xticks([1024, 4096, 8000], ["1K", "4K", "8K"])
ax.set_xlabel("prompt length")
ax.set_ylabel("NIAH mean (5 tasks x 20 prompts)")
ax.set_title("SmolLM2-135M, stage-1 recipes, rtpurbo (top-p 0.9), H200")
ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig(os.path.join(D, "summary.png"), dpi=120)
print(json.dumps(heldout, indent=1))
for r in rows:
    print(r["length"], r["recipe"], r["niah_mean"], r["blocks_frac"])
