"""`python -m benchmarks.generate`: load a converted checkpoint, generate with the hybrid cache, print tokens/s.

Runs the same prompt in `full` mode (dense cache) and `rtpurbo` mode (hybrid cache; retrieval heads on the
indexer's top-p blocks when `--indexer` is given, else dense retrieval heads), prints both texts, the decode
tokens per second (compile excluded: a warm-up call runs first, its seconds reported as `first_call_s`) and the
cache bytes of each; `--scan-layers [split|padded|uniform]` runs serving with layers scanned over a stacked cache. Defaults use the
outputs of the README's main job (`python -m train.distill`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
import time

import jax
import jax.numpy as jnp

from benchmarks.output import add_overwrite, claim, write_json
from rtpurbo_jax.checkpoint import CheckpointError, load_converted, load_indexer
from rtpurbo_jax.cli import run_cli
from rtpurbo_jax.kv_cache import cache_bytes
from rtpurbo_jax.sampling import SamplingConfig
from rtpurbo_jax.serving import generate
from rtpurbo_jax.sparse_config import SparseConfig

DEFAULT_PROMPT = "Write one sentence about the sea."


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/distill-smollm2/converted", help="converted checkpoint with roles")
    p.add_argument("--indexer", default="runs/distill-smollm2/indexer",
                   help="train.distill's indexer dir ('' or missing: retrieval heads stay dense)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0, help="sampling nucleus (not the attention top-p)")
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk (tokens)")
    p.add_argument("--modes", default="full,rtpurbo")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--scan-layers", nargs="?", const="split", default=False, choices=["split", "padded", "uniform"],
                   help="stack layers and scan over them (less compile time, see serving): 'split' (the default "
                        "when given alone) groups layers of equal head split, 'padded' of equal full / local KV "
                        "counts, 'uniform' all layers in one stack (one compiled body)")
    p.add_argument("--out", default="", help="optional JSON file for the figures")
    add_overwrite(p)
    args = p.parse_args(argv)
    claim(p, [args.out], args.overwrite)
    return args


def timed_generate(params, ids, cfg, **kw) -> tuple[dict, float, float]:
    """generate() twice (compile, then timed); returns the second result, its seconds and the first call's
    seconds (compile + one run)."""
    t0 = time.perf_counter()
    jax.block_until_ready(generate(params, ids, [ids.shape[1]], cfg=cfg, **kw)["tokens"])
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = generate(params, ids, [ids.shape[1]], cfg=cfg, **kw)
    jax.block_until_ready(out["tokens"])
    return out, time.perf_counter() - t0, first


def chat_ids(tok, prompt: str):
    if getattr(tok, "chat_template", None):
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    return tok(prompt, add_special_tokens=False)["input_ids"]


def run(args) -> dict:
    import os

    ckpt = load_converted(args.model, dtype=args.dtype)
    cfg, tok = ckpt.model_config, ckpt.tokenizer()
    if "sparse_config" not in ckpt.meta:
        raise CheckpointError(f"{args.model} has no roles; run `python -m convert` with calibration first")
    sparse = SparseConfig.from_dict(ckpt.meta["sparse_config"])
    indexer = None
    if args.indexer and os.path.isdir(args.indexer):
        indexer = load_indexer(args.indexer, cfg, sparse.index_dim)
    else:
        sparse = dataclasses.replace(sparse, top_p=1.0, prefill_mode="dense", max_blocks=None)
        print(f"[generate] no indexer at {args.indexer!r}: retrieval heads stay dense")
    ids = jnp.asarray([chat_ids(tok, args.prompt)], jnp.int32)
    kw = dict(max_new_tokens=args.max_new_tokens, chunk=args.chunk, stop_tokens=cfg.eos_tokens,
              sampling=SamplingConfig(args.temperature, args.top_k, args.top_p), scan_layers=args.scan_layers)
    report = {"model": args.model, "prompt_tokens": int(ids.shape[1]), "platform": jax.default_backend(),
              "device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "date": datetime.date.today().isoformat(), "scan_layers": args.scan_layers,
              "modes": {}}
    for mode in args.modes.split(","):
        sp = sparse if mode == "rtpurbo" else None
        out, secs, first = timed_generate(ckpt.params, ids, cfg, sparse=sp, indexer=indexer if sp else None, **kw)
        n = int(out["num_tokens"][0])
        text = tok.decode(list(out["tokens"][0, :n]), skip_special_tokens=True)
        mem = cache_bytes(out["cache"])
        report["modes"][mode] = {"new_tokens": n, "seconds": secs, "first_call_s": first, "tokens_per_s": n / secs,
                                 "text": text,
                                 "cache_bytes": mem["hybrid"], "dense_cache_bytes": mem["dense"]}
        print(f"[{mode}] {n} tokens in {secs:.2f}s = {n / secs:.1f} tokens/s (first call, with compile: {first:.1f}s); "
              f"cache {mem['hybrid'] / 2**20:.2f} MiB "
              f"({mem['ratio']:.2f} of dense)\n  {text!r}")
    if args.out:
        write_json(args.out, report)
    return report


def main(argv=None) -> int:
    return run_cli(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
