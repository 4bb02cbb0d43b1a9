"""Plot of this folder's H100 compile probes (README.md): lower + compile seconds and ms per generate call for
RTPurbo unrolled / padded scan (and full attention), before and after the in-place decode, into summary.png.
Run from the repo root: python benchmarks/results/scan_probe_h100/summarize.py"""
import json
import os

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

D = os.path.dirname(os.path.abspath(__file__))
ROWS = [("unrolled", "fresh_rtpurbo.json", "rtpurbo"), ("padded", "fresh_rtpurbo_scan_padded.json", "rtpurbo_scan_padded"),
        ("full", "fresh_full.json", "full"), ("unrolled\n(later run)", "in_place_fresh_rtpurbo.json", "rtpurbo"),
        ("padded\nin-place", "in_place_fresh_rtpurbo_scan_padded.json", "rtpurbo_scan_padded")]


def main():
    got = [(label, json.load(open(os.path.join(D, f)))["compile_probe"]["generate"][key]) for label, f, key in ROWS]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    x = range(len(got))
    a.bar(x, [r["lower_s"] for _, r in got], label="lower")
    a.bar(x, [r["compile_s"] for _, r in got], bottom=[r["lower_s"] for _, r in got], label="XLA compile")
    a.axhline(10, color="k", ls="--", lw=0.8, label="target 10 s")
    a.set_xticks(list(x), [lbl for lbl, _ in got], fontsize=7)
    a.set_ylabel("s (fresh process)")
    a.legend(fontsize=7)
    b.bar(x, [r["generate_ms_median"] for _, r in got], color="tab:green")
    b.set_xticks(list(x), [lbl for lbl, _ in got], fontsize=7)
    b.set_ylabel("ms per generate call (2K prompt + 16)")
    fig.suptitle("SmolLM2 shape, generate on one H100: first-call cost and call time", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(D, "summary.png"), dpi=110)


if __name__ == "__main__":
    main()
