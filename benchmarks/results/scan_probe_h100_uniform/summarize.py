"""generate's compile and call time per layer layout on one H100 (issue 15; session 24): the six fresh-process
`benchmarks.scan_probe` files of this folder (two rounds) -> summary.json and summary.png (lower + compile seconds
and decode tokens/s per variant and round). Run from the repo root:
python benchmarks/results/scan_probe_h100_uniform/summarize.py"""
import glob
import json
import os

D = os.path.dirname(os.path.abspath(__file__))
ORDER = ["rtpurbo", "rtpurbo_scan_padded", "rtpurbo_scan_uniform", "full_scan"]


def main():
    rows = []
    for path in sorted(glob.glob(os.path.join(D, "round*_*.json"))):
        res = json.load(open(path))
        for name, g in res["compile_probe"]["generate"].items():
            rows.append({"round": int(os.path.basename(path)[5]), "variant": name, "scan_layers": g["scan_layers"],
                         "layer_bodies": g["layer_bodies"], "stablehlo_ops": g["stablehlo_ops"],
                         "lower_s": round(g["lower_s"], 2), "compile_s": round(g["compile_s"], 2),
                         "total_s": round(g["lower_s"] + g["compile_s"], 2),
                         "generate_ms": round(g["generate_ms_median"], 1),
                         "decode_tokens_per_s": round(g["decode_tokens_per_s"], 1), "tokens": g["tokens"][0]})
    rows.sort(key=lambda r: (ORDER.index(r["variant"]), r["round"]))
    same = {tuple(r["tokens"]) for r in rows if r["variant"].startswith("rtpurbo")}
    out = {"device": res["device"], "jax": res["jax"], "date": res["date"],
           "setup": "SmolLM2-135M shape, random bf16 weights, the H200 run's calibrated roles (scan_probe_h200/"
                    "rtpurbo.json: 41 of 270 heads retrieval, window 2048), 2048-token prompt + 16 new tokens, the "
                    "device's kernels; each file a fresh process (python -m benchmarks.scan_probe --roles ... "
                    "--no-copy-probe --variants V); round 1 uniform, padded, unrolled; round 2 uniform, unrolled, "
                    "full attention scanned, on the same warm machine",
           "rtpurbo_variants_same_tokens": len(same) == 1, "target_s": 10, "rows": rows}
    json.dump(out, open(os.path.join(D, "summary.json"), "w"), indent=1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    short = {"rtpurbo": "RTPurbo\nunrolled", "rtpurbo_scan_padded": "RTPurbo\npadded", "rtpurbo_scan_uniform":
             "RTPurbo\nuniform", "full_scan": "full attn.\nscanned"}
    labels = [f"{short[r['variant']]}\nround {r['round']}" for r in rows]
    x = range(len(rows))
    a1.bar(x, [r["lower_s"] for r in rows], label="lower")
    a1.bar(x, [r["compile_s"] for r in rows], bottom=[r["lower_s"] for r in rows], label="XLA compile")
    a1.axhline(10, color="k", ls="--", lw=1, label="10 s target")
    a1.set_ylabel("s, fresh process")
    a2.bar(x, [r["decode_tokens_per_s"] for r in rows], color="tab:green")
    a2.set_ylabel("decode tokens/s (B=1)")
    for a in (a1, a2):
        a.set_xticks(list(x), labels, fontsize=6)
    a1.legend(fontsize=7)
    fig.suptitle(f"serving.generate on {res['device']}, SmolLM2 shape: compile and decode per layer layout", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(D, "summary.png"), dpi=110)
    for r in rows:
        print({k: v for k, v in r.items() if k != "tokens"})


if __name__ == "__main__":
    main()
