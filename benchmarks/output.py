"""Benchmark outputs: a result file that exists is never replaced unless asked (`--overwrite`), and JSON is written
atomically (a temporary beside it, renamed), so a crash leaves the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os


def add_overwrite(parser) -> None:
    """The `--overwrite` flag every benchmark CLI takes."""
    parser.add_argument("--overwrite", action="store_true",
                        help="replace output files that exist (default: refuse, naming the file)")


def claim(parser, paths, overwrite: bool) -> None:
    """Call before any work: a usage error (exit 2) naming the first of `paths` (None entries skipped) that
    exists, unless `overwrite`."""
    for path in paths:
        if path and os.path.exists(path) and not overwrite:
            parser.error(f"{path} exists: choose another --out, or pass --overwrite to replace it")


def write_json(path: str, obj, indent: int = 1, **dump_kw) -> None:
    """`obj` as JSON at `path` (its folder made), atomically; dump_kw go to json.dump (e.g. default=str)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent, **dump_kw)
    os.replace(tmp, path)
