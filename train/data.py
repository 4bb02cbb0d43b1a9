"""Training text -> token windows, deterministic per step and per process, with the answer rows they mark.

Sources (`load_windows`):
- a text file, a directory of .txt files (sorted), a JSON-lines file of `{"text": ...}`, `kjv` (the bundled
  corpus's training split, disjoint from calibration and evaluation text), or a .npy of token ids: packed;
  no answers marked (with `events` > 0, retrieval events are written in and their recalled values marked);
- a JSON-lines chat file, one conversation per line, `{"messages": [{"role", "content"}, ...]}` or
  `{"prompt": ..., "answer": ...}`: rendered with the model's chat template and packed; the assistant turns'
  tokens are the marked answers;
- `tasks` or `tasks:NAME,NAME`: the accuracy suite's generators (`rtpurbo_jax.evals.tasks`) over the corpus's
  `train` split, one prompt plus its answer per window (default: the five NIAH tasks in turn).
- `A+B+...`: those sources cycled step by step (`StepMix`), e.g. `tasks+kjv`: task prompts (answers marked) and
  prose (every row) in turn, each window weighted by its own source's marks.
`StepMix` also cycles windows of several lengths (stage 1's `--length-mix`).

Packed streams are cut into non-overlapping windows of `seq_len`; a seeded permutation orders them, and step s
on process p takes windows perm[(s · global_batch + p · local_batch + i) mod n] — the same windows whatever the
device count. `example(step, ...)` returns the tokens and the rows whose next token is a marked answer token
(float32 weights, 1 there; all ones where a source marks nothing).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import numpy as np

from rtpurbo_jax.evals.tasks import NIAH_TASKS, word_list


def _jsonl(source: str) -> list[dict]:
    rows = []
    with open(source, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{source} line {i + 1}: not valid JSON ({e.msg})") from e
                if not isinstance(row, dict):
                    raise ValueError(f"{source} line {i + 1}: expected a JSON object")
                rows.append(row)
    if not rows:
        raise ValueError(f"{source} holds no JSON lines")
    return rows


def is_chat(source: str) -> bool:
    """True for a JSON-lines file whose first row is a conversation (`messages`, or `prompt` and `answer`)."""
    if not source.endswith((".jsonl", ".json")) or not os.path.isfile(source):
        return False
    with open(source, encoding="utf-8") as f:
        line = next((ln for ln in f if ln.strip()), None)
    try:
        first = json.loads(line) if line is not None else None
    except json.JSONDecodeError:
        return False  # read_texts names the bad line
    return isinstance(first, dict) and ("messages" in first or {"prompt", "answer"} <= first.keys())


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
        rows = _jsonl(source)
        for i, row in enumerate(rows):
            if not isinstance(row.get("text"), str):
                raise ValueError(f"{source} row {i + 1}: expected a 'text' field (or, for chat data, 'messages' / "
                                 "'prompt' and 'answer' in every row)")
        return [r["text"] for r in rows]
    return [open(source, encoding="utf-8").read()]


def read_chat(source: str, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 [N], answer bool [N]): every conversation of a chat JSON-lines file rendered with the
    tokenizer's chat template and concatenated; True on the tokens of assistant turns."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"{source} is chat data, but the model's tokenizer has no chat template")
    ids: list[int] = []
    mark: list[bool] = []

    def render(msgs, gen=False) -> list[int]:
        if not msgs:
            return []
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        return tokenizer.encode(text, add_special_tokens=False)

    for i, row in enumerate(_jsonl(source)):
        msgs = row.get("messages") or ([{"role": "user", "content": row["prompt"]},
                                        {"role": "assistant", "content": row["answer"]}]
                                       if {"prompt", "answer"} <= row.keys() else None)
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs):
            raise ValueError(f"{source} row {i + 1}: expected 'messages' (a list of {{'role', 'content'}}) or "
                             "'prompt' and 'answer' strings")
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError(f"{source} row {i + 1}: no assistant turn to learn from")
        done: list[int] = []
        for j, m in enumerate(msgs):
            upto = render(msgs[: j + 1])
            prefix = render(msgs[:j], gen=True) if m["role"] == "assistant" else done
            if upto[: len(done)] != done or upto[: len(prefix)] != prefix:
                raise ValueError(f"{source} row {i + 1}: the chat template does not render turns as prefixes")
            cut = len(prefix) if m["role"] == "assistant" else len(upto)
            new = upto[len(done):]
            mark += [False] * (cut - len(done)) + [m["role"] == "assistant"] * (len(upto) - cut)
            ids += new
            done = upto
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids.append(tokenizer.eos_token_id)
            mark.append(False)
    return np.asarray(ids, np.int32), np.asarray(mark, bool)


def answer_weights(mark: np.ndarray) -> np.ndarray:
    """float32 [..., T]: 1 on rows whose next token is marked (mark bool [..., T]), 0 elsewhere and on the last row."""
    w = np.zeros(mark.shape, np.float32)
    w[..., :-1] = mark[..., 1:]
    return w


class PackedWindows:
    """int32 windows [n, seq_len] of a tokenized corpus (and their answer marks), served deterministically by step."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, marks: np.ndarray | None = None):
        n = len(tokens) // seq_len
        if n < 1:
            raise ValueError(f"the data has {len(tokens)} tokens: fewer than one --seq-len {seq_len} window")
        self.windows = tokens[: n * seq_len].reshape(n, seq_len).astype(np.int32)
        self.marks = None if marks is None else marks[: n * seq_len].reshape(n, seq_len)
        self.perm = np.random.default_rng(seed).permutation(n)

    @property
    def marks_answers(self) -> bool:
        return self.marks is not None

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

    def _rows(self, step, global_batch, process_index, process_count):
        local = global_batch // process_count
        return self.perm[(step * global_batch + process_index * local + np.arange(local)) % len(self.perm)]

    def batch(self, step: int, global_batch: int, process_index: int = 0, process_count: int = 1) -> np.ndarray:
        """int32 [global_batch // process_count, seq_len]: this process's rows of step `step`."""
        return self.windows[self._rows(step, global_batch, process_index, process_count)]

    def example(self, step: int, global_batch: int, process_index: int = 0, process_count: int = 1):
        """(tokens int32 [b, T], weights float32 [b, T]) of step `step`: `answer_weights` of the marks, or ones."""
        idx = self._rows(step, global_batch, process_index, process_count)
        tokens = self.windows[idx]
        if self.marks is None:
            return tokens, np.ones(tokens.shape, np.float32)
        return tokens, answer_weights(self.marks[idx])


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
    resumed run sees the same batches. The recalled values are the marked answers."""

    marks_answers = True

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, tokenizer, per_1k: float, split: str = "train"):
        super().__init__(tokens, seq_len, seed)
        self.tokenizer, self.per_1k, self.words, self.seed = tokenizer, per_1k, word_list(split), seed

    def example(self, step: int, global_batch: int, process_index: int = 0, process_count: int = 1):
        rows = super().batch(step, global_batch, process_index, process_count)
        local = global_batch // process_count
        out = [insert_events(r, self.tokenizer, np.random.default_rng([self.seed, step, process_index * local + i]),
                             self.words, self.per_1k) for i, r in enumerate(rows)]
        weights = np.zeros(rows.shape, np.float32)
        for i, (_, answer_rows) in enumerate(out):
            weights[i, answer_rows] = 1.0
        return np.stack([t for t, _ in out]), weights

    def batch(self, step: int, global_batch: int, process_index: int = 0, process_count: int = 1) -> np.ndarray:
        return self.example(step, global_batch, process_index, process_count)[0]


MIN_TASK_LEN = 512  # task windows: the multi-key / -query prompts' fixed text (~250 tokens) + a haystack + the answer


class TaskWindows:
    """Training windows from the accuracy suite's generators over the corpus's `train` split: window (step, row)
    is one prompt of `tasks[(step * global_batch + row) % len(tasks)]` with its answer appended
    (`tasks.train_example`), drawn from (seed, step, row) — deterministic, and never an evaluation prompt."""

    marks_answers = True

    def __init__(self, tokenizer, seq_len: int, seed: int, tasks: tuple[str, ...] = NIAH_TASKS, room: int = 64):
        from rtpurbo_jax.evals.tasks import Builder, _task_id

        for t in tasks:
            _task_id(t)
        if seq_len < max(MIN_TASK_LEN, 4 * room):
            raise ValueError(f"--seq-len {seq_len} is too short for task windows (>= {max(MIN_TASK_LEN, 4 * room)} tokens)")
        self.builder, self.seq_len, self.seed, self.tasks, self.room = Builder(tokenizer, "train"), seq_len, seed, tasks, room

    def example(self, step: int, global_batch: int, process_index: int = 0, process_count: int = 1):
        from rtpurbo_jax.evals.tasks import train_example

        local = global_batch // process_count
        out = []
        for i in range(local):
            row = step * global_batch + process_index * local + i
            task = self.tasks[row % len(self.tasks)]
            out.append(train_example(self.builder, task, self.seq_len, np.random.default_rng([self.seed, 911, step, row]),
                                     self.room))
        return np.stack([t for t, _ in out]), answer_weights(np.stack([m for _, m in out]))

    def batch(self, step: int, global_batch: int, process_index: int = 0, process_count: int = 1) -> np.ndarray:
        return self.example(step, global_batch, process_index, process_count)[0]


def held_out_tasks(tokenizer, seq_len: int, seed: int, batch: int, tasks: tuple[str, ...] = NIAH_TASKS,
                   room: int = 64, rows: int = 4) -> list[tuple[np.ndarray, np.ndarray]]:
    """Held-out task prompts for stage 1's evaluation: a list of (tokens int32 [batch, seq_len], answer rows int32
    [P]) covering every task at least once (row i of the whole set is a prompt of tasks[i % len(tasks)]), each a
    prompt of the accuracy suite's generator over the `eval` split (never trained on; drawn from its own seed
    stream, not the suite's prompts) with its answer appended (`tasks.answered_example`). The rows are those that
    predict the first P answer tokens — where a retrieval head must find the needle — the same for every prompt
    (answers start at seq_len - room): P = min(rows, the shortest answer's tokens)."""
    from rtpurbo_jax.evals.tasks import Builder, _task_id, answered_example

    if seq_len < max(MIN_TASK_LEN, 4 * room):
        raise ValueError(f"held-out task prompts need >= {max(MIN_TASK_LEN, 4 * room)} tokens, got {seq_len}")
    builder = Builder(tokenizer, "eval")
    n = -(-len(tasks) // batch) * batch
    made = [answered_example(builder, tasks[i % len(tasks)], seq_len,
                             np.random.default_rng([seed, 1913, _task_id(tasks[i % len(tasks)]), i]), room)
            for i in range(n)]
    p = min(rows, min(int(m.sum()) for _, m in made))
    answer_rows = np.arange(seq_len - room - 1, seq_len - room - 1 + p, dtype=np.int32)
    return [(np.stack([t for t, _ in made[i:i + batch]]), answer_rows) for i in range(0, n, batch)]


class StepMix:
    """Several window sources, one per step: step s takes `sources[s % n]`'s windows of its step s // n (so each
    source walks its own windows in order, and a resumed run sees the same batches). A step's batch is int32
    [global_batch // process_count, lengths[s % n]]; each length compiles its own step once. Row weights are each
    source's own (all ones from a source that marks nothing), so `marks_answers` if any source marks them.

    Sources of one length, `--data A+B` (`load_windows`): stage 2 on task prompts alone (answer rows only) cost
    Qwen2.5-0.5B 2-3% perplexity at 16K and full attention 5 NIAH points (benchmarks/results/
    stage2_qwen25coder05b_16k_h100/); prose windows in between keep every row in the objective (tasks+kjv, the same
    run otherwise: full attention -3.75 instead of -5.25 at 16K, perplexity no longer worse; stage2_qwen25coder05b_16k_mix/).

    Several lengths (stage 1's `--length-mix`): tried because an indexer trained on 8K windows lost 8-9 NIAH
    points at 1K and 4K where the oracle's top-p lost none. Measured since (README, 'Which training data finds the needle?'): on SmolLM2 the mix moved 1K up
    and 4K / 8K down by 3-4 points, within the seed spread — no effect shown, so it is not a default."""

    def __init__(self, sources: list, lengths: tuple[int, ...], names: tuple[str, ...] = ()):
        if len(sources) != len(lengths) or not sources or (names and len(names) != len(sources)):
            raise ValueError("StepMix needs one window source per length (and per name, when named)")
        self.sources, self.lengths = list(sources), tuple(lengths)
        self.names = tuple(names)  # `--data A+B`: each source's spec as given (() for stage 1's length mix)

    @property
    def marks_answers(self) -> bool:
        return any(s.marks_answers for s in self.sources)

    def source_index(self, step: int) -> int:
        """Which of `sources` gives step `step`'s windows."""
        return step % len(self.sources)

    def length(self, step: int) -> int:
        return self.lengths[self.source_index(step)]

    def example(self, step: int, global_batch: int, process_index: int = 0, process_count: int = 1):
        src = self.sources[self.source_index(step)]
        return src.example(step // len(self.sources), global_batch, process_index, process_count)

    def batch(self, step: int, global_batch: int, process_index: int = 0, process_count: int = 1) -> np.ndarray:
        src = self.sources[self.source_index(step)]
        return src.batch(step // len(self.sources), global_batch, process_index, process_count)


def parse_lengths(spec: str, flag: str, longest: int, shortest: int = 2) -> tuple[int, ...]:
    """Comma-separated window lengths ("1024,2048,4096") as a tuple of ints, each in [shortest, longest];
    "" gives (). Raises ValueError naming `flag` on anything else."""
    if not spec.strip():
        return ()
    try:
        out = tuple(int(x) for x in spec.split(","))
    except ValueError as e:
        raise ValueError(f"{flag} must be comma-separated integers like 1024,4096; got {spec!r}") from e
    bad = [x for x in out if not shortest <= x <= longest]
    if bad:
        raise ValueError(f"{flag} lengths must lie in [{shortest}, {longest}]; got {bad}")
    return out


def load_windows(source: str, tokenizer, seq_len: int, seed: int, events: float = 0.0):
    """The training windows of `--data` (see the module docstring). tokenizer may be None only for a .npy."""
    if "+" in source and not os.path.exists(source):
        parts = source.split("+")
        if any(not x or "+" in x for x in parts):
            raise ValueError(f"--data {source!r}: a mix is sources joined by '+', e.g. tasks+kjv")
        return StepMix([load_windows(x, tokenizer, seq_len, seed, events) for x in parts], (seq_len,) * len(parts),
                       tuple(parts))
    if source.endswith(".npy"):
        if not os.path.exists(source):
            raise ValueError(f"--data {source} does not exist")
        return PackedWindows(np.load(source).astype(np.int32).ravel(), seq_len, seed)
    if tokenizer is None:
        raise ValueError(f"--data {source} needs the model's tokenizer, and this checkpoint has none (pass a .npy)")
    if source == "tasks" or source.startswith("tasks:"):
        names = tuple(t for t in source[6:].split(",") if t) or NIAH_TASKS
        return TaskWindows(tokenizer, seq_len, seed, names)
    if is_chat(source):
        tokens, marks = read_chat(source, tokenizer)
        return PackedWindows(tokens, seq_len, seed, marks=marks)
    data = PackedWindows.from_source(source, tokenizer, seq_len, seed)
    if events > 0:
        data = EventWindows(data.windows.ravel(), seq_len, seed, tokenizer, events)
    return data


def held_out_retrieval(tokenizer, seq_len: int, seed: int, per_1k: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(int32 [seq_len] tokens, int32 [P] answer rows): evaluation prose (the `eval` split, never trained on)
    with retrieval events keyed by eval-split words — where the indexer's recall matters."""
    from convert.corpus import text_tokens

    prose = text_tokens(tokenizer, seq_len, seed, "eval")
    toks, rows = insert_events(prose, tokenizer, np.random.default_rng([seed, 7]), word_list("eval"),
                               max(per_1k, 1.0))
    return toks.astype(np.int32), np.asarray(rows, np.int32)


class Prefetch:
    """fn(i) computed ahead for a reader that asks for i, i + 1, i + 2, ... (training steps): each call returns
    fn(i) and queues fn(i + 1) .. fn(i + depth) on one background thread, so making the next batch on the host
    overlaps the device's work on this one (JAX dispatches steps asynchronously, and a blocked step releases the
    GIL). fn runs on that one thread only, never on two at once (tokenizers need not be thread-safe); it must
    depend on i alone (the windows here are deterministic per step). An exception of fn(i) is raised by the call
    that asks for i. Out-of-order calls are answered too (queued results that can no longer be asked for are
    dropped)."""

    def __init__(self, fn: Callable[[int], Any], depth: int = 2):
        self.fn, self.depth = fn, depth
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch")
        self._queued: dict[int, Future] = {}

    def __call__(self, i: int):
        for j in [j for j in self._queued if j < i or j > i + self.depth]:
            self._queued.pop(j).cancel()  # (one already running finishes first)
        fut = self._queued.pop(i, None) or self._pool.submit(self.fn, i)
        for j in range(i + 1, i + 1 + self.depth):
            if j not in self._queued:
                self._queued[j] = self._pool.submit(self.fn, j)
        return fut.result()

    def close(self) -> None:
        """Stop working ahead (the loop is over): queued results are dropped; later calls still answer."""
        self.depth = 0
        for f in self._queued.values():
            f.cancel()
        self._queued.clear()
