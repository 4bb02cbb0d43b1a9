"""CLI: `python -m convert --model PATH --out DIR [--dtype auto] [--overwrite]`.

PATH is a Hugging Face checkpoint directory (config.json + safetensors / sharded safetensors / pytorch .bin)
or a .gguf file; `--model smollm2` names the bundled SmolLM2-135M-Instruct. Writes an Orbax checkpoint plus
`rtpurbo.json` into DIR atomically (a temporary sibling renamed at the end).
"""

from __future__ import annotations

import argparse
import sys
import time

from convert.bundled import smollm2_gguf
from convert.errors import ConversionError
from convert.load import DTYPES, load_source
from rtpurbo_jax.checkpoint import save_converted


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF checkpoint dir, .gguf file, or 'smollm2' (bundled)")
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="param dtype (default: the source's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return p


def resolve_model_path(model: str) -> str:
    return smollm2_gguf() if model == "smollm2" else model


def convert(model: str, out: str, dtype: str = "auto", overwrite: bool = False, log=print) -> str:
    """Convert `model` into `out`; returns the output path."""
    t0 = time.time()
    path = resolve_model_path(model)
    log(f"[convert] reading {path}")
    cfg, params, tokenizer = load_source(path, dtype)
    log(f"[convert] {cfg.model_type}: {cfg.num_layers} layers, {cfg.num_heads} q / {cfg.num_kv_heads} kv heads, "
        f"head_dim {cfg.head_dim} ({time.time() - t0:.1f}s)")
    out = save_converted(out, params, cfg, tokenizer=tokenizer, source=path, overwrite=overwrite)
    log(f"[convert] wrote {out} ({time.time() - t0:.1f}s)")
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        convert(args.model, args.out, args.dtype, args.overwrite)
    except (ConversionError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
