"""RULER-style long-context tasks, generated offline and deterministically from a seed (our own generators,
after the task definitions of RULER, Hsieh et al. 2024), plus their scorers.

Every prompt is a chat-formatted user turn (the model's own template) followed by an answer prefix, and has
exactly `length` tokens. Haystacks: `noise` (one repeated filler paragraph) or `prose` (the corpus's `eval`
split, held out from calibration and training). Needle keys are two corpus words joined by a hyphen;
values are 7-digit numbers, corpus words or UUIDs drawn from the seed.

| task | kind | what is asked | score (per prompt, 0-100) |
|---|---|---|---|
| niah_single_noise | retrieval | one number needle in noise | 100 if the value is in the output |
| niah_single_prose | retrieval | one number needle in prose | same |
| niah_single_word | retrieval | one word value in prose | same |
| niah_single_uuid | retrieval | one UUID value in prose | same |
| niah_multikey | retrieval | 4 needles with different keys, one asked | same |
| niah_multivalue | retrieval | 4 values under one key, all asked | % of values in the output |
| niah_multiquery | retrieval | 4 needles, all 4 asked | % of values in the output |
| variable_tracking | retrieval | a 4-hop chain of assignments in noise | % of chain variables in the output |
| common_words | aggregation | 10 words each repeated (a 25th of the list) among words seen once | % of the 10 in the output |
| frequent_words | aggregation | 3 most frequent words of a skewed list | % of the 3 in the output |

Seeds: a prompt's randomness comes from (`seed`, task, length, index) only, so any mode sees the same prompts.
Training examples (`train_example`, stage 2's `--data tasks`) come from the same generators over the corpus's
`train` split (haystack prose and needle words), so they never share text with evaluation prompts.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import uuid as _uuid

import numpy as np

NOISE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
TASKS = {
    "niah_single_noise": "retrieval", "niah_single_prose": "retrieval", "niah_single_word": "retrieval",
    "niah_single_uuid": "retrieval", "niah_multikey": "retrieval", "niah_multivalue": "retrieval",
    "niah_multiquery": "retrieval", "variable_tracking": "retrieval", "common_words": "aggregation",
    "frequent_words": "aggregation",
}
# the tasks a 135M model solves at all: the README's "NIAH mean", stage 1's task windows, the paired comparison
NIAH_TASKS = ("niah_single_noise", "niah_single_prose", "niah_multikey", "niah_multivalue", "niah_multiquery")
DEPTH = (0.05, 0.95)  # where needles go, as fractions of the haystack (RULER's spread)
MAX_NEW = {"niah_single_uuid": 40, "niah_multivalue": 48, "niah_multiquery": 48, "variable_tracking": 40,
           "common_words": 48, "frequent_words": 16}  # generated tokens per task (default 12)


@dataclasses.dataclass(frozen=True)
class Prompt:
    tokens: np.ndarray  # int32 [length]
    answers: tuple[str, ...]  # every string the output must contain
    task: str


@functools.lru_cache(maxsize=4)
def word_list(split: str = "eval") -> tuple[str, ...]:
    """Sorted distinct lowercase words of 4-9 letters of a corpus split: needle keys, values, word lists (and
    the keys of stage 1's retrieval events)."""
    from convert.corpus import split_verses

    words = set()
    for v in split_verses(split):
        words.update(w for w in re.findall(r"[a-z]+", v.lower()) if 4 <= len(w) <= 9)
    return tuple(sorted(words))


def _key(rng, words) -> str:
    return f"{words[rng.integers(len(words))]}-{words[rng.integers(len(words))]}"


def _number(rng) -> str:
    return str(int(rng.integers(1_000_000, 10_000_000)))


def _value(rng, kind: str, words) -> str:
    if kind == "uuid":
        return str(_uuid.UUID(bytes=rng.bytes(16), version=4))
    if kind == "word":
        return words[rng.integers(len(words))]
    return _number(rng)


class Builder:
    """Turns (haystack, inserted sentences, question, answer prefix) into exactly `length` tokens. `split`: the
    corpus split of haystack prose and needle words (`eval` for evaluation, `train` for training examples)."""

    def __init__(self, tok, split: str = "eval"):
        self.tok, self.split, self.words = tok, split, word_list(split)
        head, tail = tok.apply_chat_template([{"role": "user", "content": "XXXX"}], add_generation_prompt=True,
                                             tokenize=False).split("XXXX")
        self.head, self.tail = head, tail

    def enc(self, s: str) -> list[int]:
        return self.tok.encode(s, add_special_tokens=False)

    def haystack(self, kind: str, n: int, rng) -> list[int]:
        if kind == "noise":
            unit = self.enc(NOISE)
            return (unit * (n // len(unit) + 1))[:n]
        from convert.corpus import text_tokens

        return text_tokens(self.tok, n, int(rng.integers(2 ** 31)), self.split).tolist()

    def build(self, length: int, intro: str, hay_kind: str, inserts: list[str], question: str, prefix: str, rng,
              depth: tuple[float, float] = DEPTH) -> np.ndarray:
        """Prompt tokens: chat head + intro + haystack with `inserts` at sorted depths (fractions of the haystack)
        drawn uniformly from `depth` + question + prefix."""
        pre, post = self.enc(self.head + intro), self.enc(question + self.tail + prefix)
        ins = [self.enc(" " + s + " ") for s in inserts]
        n_hay = length - len(pre) - len(post) - sum(len(x) for x in ins)
        if n_hay < 16:
            raise ValueError(f"length {length} leaves no room for a haystack")
        hay = self.haystack(hay_kind, n_hay, rng)
        depths = sorted(rng.uniform(depth[0], depth[1], len(ins)))
        out, last = list(pre), 0
        for d, x in zip(depths, ins):
            at = int(d * n_hay)
            out += hay[last:at] + x
            last = at
        out += hay[last:] + post
        assert len(out) == length, (len(out), length)
        return np.asarray(out, np.int32)


def _needle(k: str, v: str, kind: str) -> str:
    what = {"number": "special magic number", "word": "special magic word", "uuid": "special magic uuid"}[kind]
    return f"One of the {what}s for {k} is: {v}."


def _niah(b: Builder, length, rng, *, hay, kind, n_keys=1, n_values=1, n_queries=1, depth=None):
    what = {"number": "special magic number", "word": "special magic word", "uuid": "special magic uuid"}[kind]
    keys = [_key(rng, b.words) for _ in range(n_keys)]
    values = [[_value(rng, kind, b.words) for _ in range(n_values)] for _ in keys]
    inserts = [_needle(k, v, kind) for k, vs in zip(keys, values) for v in vs]
    order = rng.permutation(len(inserts))
    inserts = [inserts[i] for i in order]
    asked = keys[:n_queries]
    answers = tuple(v for vs in values[:n_queries] for v in vs)
    intro = ("Some special magic " + what.split()[-1] + "s are hidden within the following text. "
             "Make sure to memorize it. I will quiz you about them afterwards.\n")
    if n_values > 1:
        question = f"\nWhat are all the {what}s for {asked[0]} mentioned in the provided text?"
        prefix = f"The {what}s for {asked[0]} mentioned in the provided text are"
    elif n_queries > 1:
        joined = ", ".join(asked[:-1]) + f", and {asked[-1]}"
        question = f"\nWhat are all the {what}s for {joined} mentioned in the provided text?"
        prefix = f"The {what}s for {joined} mentioned in the provided text are"
    else:
        question = f"\nWhat is the {what} for {asked[0]} mentioned in the provided text?"
        prefix = f"The {what} for {asked[0]} mentioned in the provided text is"
    return b.build(length, intro, hay, inserts, question, prefix, rng, depth or DEPTH), answers


def _variable_tracking(b: Builder, length, rng, hops: int = 4):
    names = set()
    while len(names) < hops + 1:
        names.add("".join(chr(ord("A") + int(c)) for c in rng.integers(0, 26, 5)))
    names = sorted(names, key=lambda _: rng.random())
    value = _number(rng)
    inserts = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i + 1]} = {names[i]}." for i in range(hops)]
    question = (f"\nFind all variables that are assigned the value {value} in the text above.")
    prefix = (f"Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} variables "
              f"are assigned the value {value}, they are:")
    intro = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n"
    return b.build(length, intro, "noise", inserts, question, prefix, rng), tuple(names)


def _fill(items: list[str], b: Builder, budget: int) -> tuple[list[int], int]:
    """Tokens of the leading whole items that fit in `budget`, and how many items that is."""
    ids: list[int] = []
    for used, item in enumerate(items):
        x = b.enc(item)
        if len(ids) + len(x) > budget:
            return ids, used
        ids += x
    return ids, len(items)


def _word_list_prompt(b: Builder, length, rng, *, top: int):
    """A word list filling the prompt. top=10 (common words): a numbered list where 10 words appear
    equally often (a 25th of the items, at least 3 times each) and the others once. top=3 (frequent words): words drawn from a Zipf(1.3)
    law over 200 words; the answer is the 3 most frequent in the final list."""
    vocab = b.words
    pick = rng.choice(len(vocab), 4000, replace=False)
    common, rare = [vocab[i] for i in pick[:top]], [vocab[i] for i in pick[top:]]
    if top == 10:
        intro = "Below is a numbered list of words. In these words, some appear more often than others.\n"
        question = "\nQuestion: What are the 10 most common words in the above list?"
        prefix = "Answer: The top 10 words that appear most often in the list are:"
    else:
        intro = "Read the following coded text and track the frequency of each coded word.\n"
        question = "\nQuestion: What are the three most frequently appeared words in the above coded text?"
        prefix = "Answer: According to the coded text above, the three most frequently appeared words are:"
    pre, post = b.enc(b.head + intro), b.enc(question + b.tail + prefix)
    budget = length - len(pre) - len(post)
    if top == 10:  # size the list so that every item fits: each common word then appears `reps` times
        n_items = budget // 4
        for _ in range(8):
            reps = max(3, n_items // 25)
            words = [w for w in common for _ in range(reps)] + rare[: max(0, n_items - 10 * reps)]
            rng.shuffle(words)
            ids, used = _fill([f" {i + 1}. {w}" for i, w in enumerate(words)], b, budget)
            if used == len(words):
                break
            n_items = int(used * 0.97)
        else:
            raise ValueError(f"could not fit a common-words list into {length} tokens")
    else:
        p = 1.0 / np.arange(1, 201) ** 1.3
        words = [(common + rare)[i] for i in rng.choice(200, 4 * length, p=p / p.sum())]
        ids, used = _fill([" " + w for w in words], b, budget)
    ids += b.haystack("noise", budget - len(ids), rng) if budget > len(ids) else []
    out = np.asarray(pre + ids + post, np.int32)
    if len(out) != length:
        raise ValueError(f"could not fill a {length}-token word-list prompt")
    if top == 10:
        return out, tuple(common)
    counts: dict[str, int] = {}
    for w in words[:used]:
        counts[w] = counts.get(w, 0) + 1
    return out, tuple(sorted(counts, key=lambda w: -counts[w])[:top])


def make_prompt(tok, task: str, length: int, index: int, seed: int = 0, builder: Builder | None = None,
                depth: tuple[float, float] | None = None) -> Prompt:
    """The `index`-th prompt of `task` at `length` tokens (deterministic in (seed, task, length, index, depth)).

    depth: (lo, hi) fractions of the haystack where the needles of the NIAH tasks go (default `DEPTH`, RULER's
    spread); e.g. near 0 to put them farther from the question than a local window reaches."""
    if depth is not None and not (0.0 <= depth[0] <= depth[1] <= 1.0):
        raise ValueError(f"depth must be (lo, hi) with 0 <= lo <= hi <= 1, got {depth}")
    if depth is not None and not task.startswith("niah"):
        raise ValueError(f"depth places needles; task {task!r} has none (only the niah_* tasks take it)")
    rng = np.random.default_rng([seed, _task_id(task), length, index])
    return _generate(builder or Builder(tok), task, length, rng, depth)


def _task_id(task: str) -> int:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {sorted(TASKS)}")
    return sorted(TASKS).index(task)


def train_example(builder: Builder, task: str, length: int, rng, room: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A training example of exactly `length` tokens: a `task` prompt of `length - room` tokens (from `builder`,
    a `train`-split Builder), then its answer (`answer_text`) and end-of-text tokens. Returns (tokens int32
    [length], answer bool [length]: True on the answer's tokens, cut to `room - 1`)."""
    if builder.split == "eval":
        raise ValueError("training examples must not come from the eval split (use Builder(tok, 'train'))")
    return answered_example(builder, task, length, rng, room)


def answered_example(builder: Builder, task: str, length: int, rng, room: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """`train_example` from a Builder of either split (stage 1's held-out task prompts use the eval split's)."""
    p = _generate(builder, task, length - room, rng)
    ans = builder.enc(answer_text(p.answers))[: room - 1]
    eos = builder.tok.eos_token_id if builder.tok.eos_token_id is not None else ans[-1]
    tail = ans + [eos] * (room - len(ans))
    mark = np.zeros(length, bool)
    mark[length - room: length - room + len(ans)] = True
    return np.concatenate([p.tokens, np.asarray(tail, np.int32)]), mark


def answer_text(answers: tuple[str, ...]) -> str:
    """The reference continuation of a prompt's answer prefix: " a, b and c." (what training examples append)."""
    body = answers[0] if len(answers) == 1 else ", ".join(answers[:-1]) + " and " + answers[-1]
    return f" {body}."


def _generate(b: Builder, task: str, length: int, rng, depth=None) -> Prompt:
    _task_id(task)
    if task == "niah_single_noise":
        t, a = _niah(b, length, rng, hay="noise", kind="number", depth=depth)
    elif task == "niah_single_prose":
        t, a = _niah(b, length, rng, hay="prose", kind="number", depth=depth)
    elif task == "niah_single_word":
        t, a = _niah(b, length, rng, hay="prose", kind="word", depth=depth)
    elif task == "niah_single_uuid":
        t, a = _niah(b, length, rng, hay="prose", kind="uuid", depth=depth)
    elif task == "niah_multikey":
        t, a = _niah(b, length, rng, hay="prose", kind="number", n_keys=4, depth=depth)
    elif task == "niah_multivalue":
        t, a = _niah(b, length, rng, hay="prose", kind="number", n_values=4, depth=depth)
    elif task == "niah_multiquery":
        t, a = _niah(b, length, rng, hay="prose", kind="number", n_keys=4, n_queries=4, depth=depth)
    elif task == "variable_tracking":
        t, a = _variable_tracking(b, length, rng)
    elif task == "common_words":
        t, a = _word_list_prompt(b, length, rng, top=10)
    else:
        t, a = _word_list_prompt(b, length, rng, top=3)
    return Prompt(t, a, task)


def score(output: str, answers: tuple[str, ...]) -> float:
    """0-100: the percentage of `answers` found in `output` (case-insensitive; RULER's string_match_all)."""
    if not answers:
        raise ValueError("a prompt needs at least one answer")
    low = output.lower()
    return 100.0 * sum(a.lower() in low for a in answers) / len(answers)


def max_new_tokens(task: str) -> int:
    return MAX_NEW.get(task, 12)
