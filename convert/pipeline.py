"""Conversion as a function: `convert(model, out, dtype, overwrite, roles=RoleOptions(...))`.

`python -m convert` maps its flags onto these arguments; `train.distill` calls `convert` directly.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp

from convert.bundled import smollm2_gguf
from convert.calibrate import CalibConfig, calibrate_model, write_report
from convert.load import load_source
from rtpurbo_jax.checkpoint import check_replaceable, save_converted
from rtpurbo_jax.sparse_config import SparseConfig


@dataclasses.dataclass(frozen=True)
class RoleOptions:
    """How calibration marks retrieval heads (the CLI's calibration flags, same names and defaults)."""

    retrieval_ratio: float = 0.15  # fraction of query heads (0, 1]
    retrieval_heads: int | None = None  # exact number of retrieval query heads (overrides the ratio)
    role_granularity: str = "query"  # query: per query head (the paper); kv: whole GQA groups
    per_layer: bool = False  # rank heads within each layer instead of globally
    calib_len: int | None = None  # tokens per document (default min(4096, positions))
    calib_docs: int = 4
    needle_len: int = 64
    seed: int = 0
    window: int | None = None  # local window (default `default_window`)
    sinks: int = 4


def default_window(max_positions: int) -> int:
    """The paper's 8192-token window, scaled down for short models: min(8192, positions // 4), >= 64.

    Measured (issue 13, SmolLM2-135M, 8K positions, retrieval heads dense): a 512-token window (positions / 16,
    the earlier default) loses most pass-key answers past 2K; 2048 answers like full attention
    (`benchmarks/results/accuracy_*`: the dense_retrieval_w<W> rows)."""
    return max(64, min(8192, max_positions // 4))


def run_calibration(params, cfg, tokenizer, args: "RoleOptions", log=print):
    """(SparseConfig, report) for the converted params."""
    if args.window is not None and args.window < 1:
        raise ValueError(f"--window must be >= 1, got {args.window}")
    window = args.window or default_window(cfg.max_position_embeddings)
    calib_len = args.calib_len or min(4096, cfg.max_position_embeddings)
    # the long-range score (a cross-check of the needle score, not the roles) needs keys beyond the window:
    # with documents no longer than the window it scores beyond a quarter of the document instead
    score_window = window if calib_len > window + args.sinks + args.needle_len else max(16, calib_len // 4)
    calib = CalibConfig(ratio=args.retrieval_ratio, num_retrieval=args.retrieval_heads,
                        granularity=args.role_granularity, per_layer=args.per_layer, calib_len=calib_len,
                        calib_docs=args.calib_docs, needle_len=args.needle_len, seed=args.seed, window=score_window,
                        sinks=args.sinks)
    calib.validate(cfg)
    if tokenizer is None:
        log("[calibrate] warning: the source has no tokenizer; calibrating on random-token documents")
    log(f"[calibrate] {calib.calib_docs} documents x {calib.calib_len} tokens, {calib.granularity} granularity")
    t0 = time.time()
    jparams = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    report = calibrate_model(jparams, cfg, calib, tokenizer, progress=lambda i, n: log(
        f"[calibrate] document {i}/{n} ({time.time() - t0:.0f}s, {i * calib.calib_len / (time.time() - t0):.0f} tok/s)"))
    sparse = SparseConfig(roles=report["roles"], sinks=args.sinks, window=window,
                          seqlen_threshold=min(16384, 2 * window), granularity=args.role_granularity)
    log(f"[calibrate] {report['num_retrieval']}/{report['total_heads']} retrieval heads; stability (top-k overlap "
        f"across docs) {report['stability']['pairwise_topk_overlap']}; agreement with long-range score "
        f"{report['agreement']['topk_overlap']:.2f}")
    return sparse, report


def resolve_model_path(model: str) -> str:
    return smollm2_gguf() if model == "smollm2" else model


def convert(model: str, out: str, dtype: str = "auto", overwrite: bool = False, log=print,
            roles: "RoleOptions | None" = None) -> str:
    """Convert `model` (HF dir, .gguf, or "smollm2") into `out`; with `roles`, calibrate first and write the
    retrieval heads into rtpurbo.json. Returns the output path. Refuses an existing `out` unless `overwrite`,
    and never replaces anything but an earlier converted output (`checkpoint.check_replaceable`)."""
    args = roles
    t0 = time.time()
    path = resolve_model_path(model)
    if os.path.exists(out):  # refuse before the expensive part; save_converted checks again at the rename
        if not overwrite:
            raise FileExistsError(f"output {os.path.abspath(out)} exists; pass --overwrite to replace it")
        check_replaceable(out, protect=(path,))
    log(f"[convert] reading {path}")
    cfg, params, tokenizer = load_source(path, dtype)
    log(f"[convert] {cfg.model_type}: {cfg.num_layers} layers, {cfg.num_heads} q / {cfg.num_kv_heads} kv heads, "
        f"head_dim {cfg.head_dim} ({time.time() - t0:.1f}s)")
    sparse, report, extra = None, None, {}
    if args is not None:
        sparse, report = run_calibration(params, cfg, tokenizer, args, log)
        extra["headwise_config"] = sparse.to_headwise()
    out = save_converted(out, params, cfg, tokenizer=tokenizer, source=path, overwrite=overwrite,
                         sparse_config=None if sparse is None else sparse.to_dict(), extra=extra,
                         write_extra_files=None if report is None else lambda d: write_report(report, d))
    log(f"[convert] wrote {out} ({time.time() - t0:.1f}s)")
    return out
