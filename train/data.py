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


def corpus_words(split: str) -> tuple[str, ...]:
    """Sorted distinct lowercase words of 4-9 letters of a corpus split (keys and values of retrieval events)."""
    import re

    from convert.corpus import split_verses

    return tuple(sorted({w for v in split_verses(split) for w in re.findall(r"[a-z]+", v.lower()) if 4 <= len(w) <= 9}))


def insert_events(window: np.ndarray, tokenizer, rng, words: tuple[str, ...], per_1k: float) -> tuple[np.ndarray, list[int]]:
    """A copy of `window` (int32 [T]) with retrieval events written over its text, and the rows where an answer
    is retrieved (the value tokens of each recall).

    Events (about `per_1k` per 1K tokens, at least one): a fact " The code of KEY is VALUE. " at a random early
    position and, at least 256 tokens later, its recall " What is the code of KEY? It is VALUE. "; every other
    event copies a 32-96-token span of the window to a later position (a repeated span). Keys are two corpus
    words, values a number or a word. These are what retrieval heads exist for and what prose windows rarely
    hold (RTPurbo trains on 32K-80K-token documents; a few 8K prose windows have almost no far retrieval).
    """
    out = window.copy()
    t = len(out)
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)
    n = max(1, int(round(per_1k * t / 1024)))
    rows: list[int] = []
    for e in range(n):
        if e % 2 == 0:
            key = f"{words[rng.integers(len(words))]}-{words[rng.integers(len(words))]}"
            value = str(int(rng.integers(10_000, 100_000_000))) if rng.random() < 0.6 else words[rng.integers(len(words))]
            fact, ask, val = enc(f" The code of {key} is {value}. "), enc(f" What is the code of {key}? It is"), enc(f" {value}. ")
        else:
            span = int(rng.integers(32, 97))
            src = int(rng.integers(0, max(1, t // 2 - span)))
            fact, ask, val = [], list(out[src: src + span // 2]), list(out[src + span // 2: src + span])
        need = len(fact) + len(ask) + len(val) + 256
        if need >= t:
            continue
        a = int(rng.integers(0, t - need + 1)) if fact else 0
        b = int(rng.integers(a + len(fact) + 256, t - len(ask) - len(val) + 1))
        if fact:
            out[a: a + len(fact)] = fact
        out[b: b + len(ask)] = ask
        out[b + len(ask): b + len(ask) + len(val)] = val
        rows += list(range(b + len(ask) - 1, b + len(ask) + len(val) - 1))  # rows that predict the value tokens
    return out, sorted(set(rows))


class EventWindows(PackedWindows):
    """PackedWindows with retrieval events (`insert_events`) drawn per (seed, step, row): deterministic, so a
    resumed run sees the same batches."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, tokenizer, per_1k: float, split: str = "train"):
        super().__init__(tokens, seq_len, seed)
        self.tokenizer, self.per_1k, self.words, self.seed = tokenizer, per_1k, corpus_words(split), seed

    def batch(self, step: int, global_batch: int, process_index: int = 0, process_count: int = 1) -> np.ndarray:
        rows = super().batch(step, global_batch, process_index, process_count)
        local = global_batch // process_count
        return np.stack([insert_events(r, self.tokenizer, np.random.default_rng([self.seed, step, process_index * local + i]),
                                       self.words, self.per_1k)[0] for i, r in enumerate(rows)])


def held_out_retrieval(tokenizer, seq_len: int, seed: int, per_1k: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(int32 [seq_len] tokens, int32 [P] answer rows): evaluation prose (the `eval` split, never trained on)
    with retrieval events keyed by eval-split words — where the indexer's recall matters."""
    from convert.corpus import text_tokens

    prose = text_tokens(tokenizer, seq_len, seed, "eval")
    toks, rows = insert_events(prose, tokenizer, np.random.default_rng([seed, 7]), corpus_words("eval"),
                               max(per_1k, 1.0))
    return toks.astype(np.int32), np.asarray(rows, np.int32)
