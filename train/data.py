"""Training text -> packed token windows, deterministic per step and per process.

Sources: a text file, a directory of .txt files (sorted), a JSON-lines file (field `text`), or `kjv` (the
bundled corpus's training split, disjoint from calibration and evaluation text). The token stream is cut into
non-overlapping windows of `seq_len`; a seeded permutation orders them, and step s on process p takes
windows perm[(s · global_batch + p · local_batch + i) mod n] — the same windows whatever the device count.
"""

from __future__ import annotations

import json
import os

import numpy as np


def read_texts(source: str) -> list[str]:
    if source == "kjv":
        from convert.corpus import split_verses

        return [" ".join(split_verses("train"))]
    if os.path.isdir(source):
        files = sorted(f for f in os.listdir(source) if f.endswith(".txt"))
        if not files:
            raise ValueError(f"--data directory {source} holds no .txt files")
        return [open(os.path.join(source, f), encoding="utf-8").read() for f in files]
    if not os.path.exists(source):
        raise ValueError(f"--data {source} does not exist (a .txt, a directory of .txt, a .jsonl, or 'kjv')")
    if source.endswith((".jsonl", ".json")):
        texts = []
        with open(source, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if line.strip():
                    try:
                        texts.append(json.loads(line)["text"])
                    except (json.JSONDecodeError, KeyError) as e:
                        raise ValueError(f"{source} line {i + 1}: expected a JSON object with a 'text' field") from e
        return texts
    return [open(source, encoding="utf-8").read()]


class PackedWindows:
    """int32 windows [n, seq_len] of a tokenized corpus, served deterministically by step."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int):
        n = len(tokens) // seq_len
        if n < 1:
            raise ValueError(f"the data has {len(tokens)} tokens: fewer than one --seq-len {seq_len} window")
        self.windows = tokens[: n * seq_len].reshape(n, seq_len).astype(np.int32)
        self.perm = np.random.default_rng(seed).permutation(n)

    @classmethod
    def from_source(cls, source: str, tokenizer, seq_len: int, seed: int, max_tokens: int | None = None):
        ids: list[int] = []
        for text in read_texts(source):
            ids.extend(tokenizer.encode(text, add_special_tokens=False))
            if tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
            if max_tokens and len(ids) >= max_tokens:
                break
        return cls(np.asarray(ids[:max_tokens] if max_tokens else ids, np.int32), seq_len, seed)

    def batch(self, step: int, global_batch: int, process_index: int = 0, process_count: int = 1) -> np.ndarray:
        """int32 [global_batch // process_count, seq_len]: this process's rows of step `step`."""
        local = global_batch // process_count
        idx = step * global_batch + process_index * local + np.arange(local)
        return self.windows[self.perm[idx % len(self.perm)]]
