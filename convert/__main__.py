"""CLI: `python -m convert --model PATH --out DIR [calibration flags] [--overwrite]`.

PATH is a Hugging Face checkpoint directory (config.json + safetensors / sharded safetensors / pytorch .bin)
or a .gguf file; `--model smollm2` names the bundled SmolLM2-135M-Instruct. Writes an Orbax checkpoint plus
`rtpurbo.json` into DIR atomically (a temporary sibling renamed at the end). Unless `--no-calibrate`, it
first finds the retrieval heads (`convert.calibrate`) and writes their roles into `rtpurbo.json` (as a
SparseConfig and as RTP-LLM's `headwise_config`) with `calibration.json` / `calibration.png` beside it.
The work is `convert.pipeline.convert`; this module only maps flags onto it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from convert.load import DTYPES
from convert.pipeline import RoleOptions, convert
from rtpurbo_jax.cli import run_cli

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF checkpoint dir, .gguf file, or 'smollm2' (bundled)")
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="param dtype (default: the source's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    c = p.add_argument_group("retrieval-head calibration")
    c.add_argument("--no-calibrate", action="store_true", help="skip calibration (no roles are written)")
    c.add_argument("--retrieval-ratio", type=float, default=0.15, help="fraction of query heads (0, 1]")
    c.add_argument("--retrieval-heads", type=int, default=None, help="exact number of retrieval query heads")
    c.add_argument("--role-granularity", choices=["query", "kv"], default="query",
                   help="query: roles per query head (the paper); kv: whole GQA groups (real KV-cache savings)")
    c.add_argument("--per-layer", action="store_true", help="rank heads within each layer instead of globally")
    c.add_argument("--calib-len", type=int, default=None, help="tokens per document (default min(4096, positions))")
    c.add_argument("--calib-docs", type=int, default=4, help="documents to average over")
    c.add_argument("--needle-len", type=int, default=64, help="tokens in the repeated needle span")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--window", type=int, default=None,
                   help="local window (default: min(8192, positions // 4), e.g. 2048 for an 8K model)")
    c.add_argument("--sinks", type=int, default=4)
    return p


def role_options(args: argparse.Namespace) -> RoleOptions | None:
    """The calibration flags as RoleOptions (None with --no-calibrate)."""
    if args.no_calibrate:
        return None
    return RoleOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RoleOptions)})


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: convert(args.model, args.out, args.dtype, args.overwrite, roles=role_options(args)))


if __name__ == "__main__":
    sys.exit(main())
