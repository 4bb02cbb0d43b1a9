"""Training data (`train.data`): the answer rows each source marks — chat JSON-lines (assistant turns), the
accuracy suite's generators over the train split (`--data tasks`), retrieval events — and stage 2's loss
restricted to them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rtpurbo_jax.evals.tasks import Builder, answer_text, train_example, word_list
from train.data import (NIAH_TASKS, PackedWindows, StepMix, TaskWindows, answer_weights, held_out_tasks, is_chat,
                        load_windows, parse_lengths, read_chat)


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer):
    return smollm2_tokenizer


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_answer_weights_mark_the_rows_that_predict_answers():
    mark = np.array([[0, 0, 1, 1, 0, 1]], bool)
    np.testing.assert_array_equal(answer_weights(mark), [[0, 1, 1, 0, 1, 0]])


def test_chat_jsonl_marks_exactly_the_assistant_turns(tok, tmp_path):
    src = _write(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue sky."},
                      {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Green grass."}]},
        {"prompt": "What is two plus two?", "answer": "Four, of course."}])
    assert is_chat(src)
    ids, mark = read_chat(src, tok)
    assert ids.shape == mark.shape and ids.dtype == np.int32
    runs = np.flatnonzero(np.diff(np.r_[0, mark.astype(int), 0]))  # starts and ends of the marked runs
    spans = [tok.decode(ids[a:b]) for a, b in zip(runs[::2], runs[1::2])]
    assert len(spans) == 3
    for span, want in zip(spans, ["Blue sky.", "Green grass.", "Four, of course."]):
        assert span.startswith(want), (span, want)  # the content (and the turn's end marker), not the header
    assert "Name a colour" not in "".join(spans) and "assistant" not in "".join(spans)
    w = PackedWindows(ids, 32, 0, marks=mark)
    t, wt = w.example(0, 2)
    assert t.shape == wt.shape == (2, 32) and w.marks_answers
    np.testing.assert_array_equal(wt, answer_weights(w.marks[w.perm[[0, 1]]]))


@pytest.mark.parametrize("rows, match", [
    ([{"messages": [{"role": "user", "content": "hi"}]}], "no assistant turn"),
    ([{"messages": [{"role": "user"}]}], "'messages'"),
    ([{"prompt": "a", "answer": "b"}, {"text": "c"}], "row 2"),
])
def test_bad_chat_rows_are_named(tok, tmp_path, rows, match):
    with pytest.raises(ValueError, match=match):
        read_chat(_write(tmp_path / "bad.jsonl", rows), tok)


def test_bad_text_jsonl_is_named(tok, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        load_windows(str(bad), tok, 16, 0)
    with pytest.raises(ValueError, match="row 2: expected a 'text' field"):
        load_windows(_write(tmp_path / "b2.jsonl", [{"text": "a"}, {"body": "b"}]), tok, 16, 0)


def test_task_windows_append_the_answer_and_mark_it(tok):
    data = load_windows("tasks", tok, 768, seed=3)
    assert isinstance(data, TaskWindows) and data.tasks == NIAH_TASKS
    t, w = data.example(2, 3)
    t2, w2 = data.example(2, 3)
    assert t.shape == w.shape == (3, 768) and t.dtype == np.int32
    np.testing.assert_array_equal(t, t2)
    np.testing.assert_array_equal(w, w2)
    assert not np.array_equal(t, data.example(3, 3)[0])
    for row in range(3):
        rows = np.flatnonzero(w[row])
        assert rows.size and rows.min() >= 768 - 64 - 1
        answer = tok.decode(t[row, rows + 1])
        assert answer.strip().endswith(".") and any(ch.isdigit() for ch in answer)
        prompt = tok.decode(t[row, : 768 - 64])
        assert all(part.strip(" .") in prompt for part in answer.replace(" and ", ",").split(","))
    one = load_windows("tasks:niah_single_prose", tok, 512, 0)
    assert one.tasks == ("niah_single_prose",)
    with pytest.raises(ValueError, match="unknown task"):
        load_windows("tasks:nope", tok, 512, 0)


def test_held_out_task_prompts_cover_every_task_at_their_answer_rows(tok):
    """Stage 1's held-out task prompts: eval-split prompts of every NIAH task, batched like training, their rows
    the ones that predict the first answer tokens (the needle's value, which the prompt holds)."""
    got = held_out_tasks(tok, 512, seed=0, batch=2)
    again = held_out_tasks(tok, 512, seed=0, batch=2)
    assert len(got) == 3  # 5 tasks in batches of 2
    train = TaskWindows(tok, 512, 0).example(0, 2)[0]
    for (t, rows), (t2, rows2) in zip(got, again):
        np.testing.assert_array_equal(t, t2)
        np.testing.assert_array_equal(rows, rows2)
        assert t.shape == (2, 512) and t.dtype == np.int32 and 1 <= rows.size <= 4
        assert rows[0] == 512 - 64 - 1 and (np.diff(rows) == 1).all()
        assert not any(np.array_equal(a, b) for a in t for b in train)
        for row in t:
            first = tok.decode(row[rows + 1]).strip()
            assert first and first[:3] in tok.decode(row[: 512 - 64])  # the answer's start is in the prompt
    assert not np.array_equal(got[0][0], held_out_tasks(tok, 512, seed=1, batch=2)[0][0])
    with pytest.raises(ValueError, match="512 tokens"):
        held_out_tasks(tok, 400, 0, 1)
    with pytest.raises(ValueError, match="too short for task windows"):
        TaskWindows(tok, 400, 0)


def test_training_examples_never_come_from_the_eval_split(tok):
    with pytest.raises(ValueError, match="eval split"):
        train_example(Builder(tok), "niah_single_prose", 512, np.random.default_rng(0))
    assert not set(word_list("train")) <= set(word_list("eval"))
    t, m = train_example(Builder(tok, "train"), "niah_multivalue", 600, np.random.default_rng(1))
    assert t.shape == m.shape == (600,)
    assert tok.decode(t[m]).startswith(answer_text(("x",))[:1])


def test_event_windows_mark_the_recalled_values(tok):
    data = load_windows("kjv", tok, 1024, 0, events=2.0)
    t, w = data.example(0, 2)
    assert data.marks_answers and t.shape == w.shape == (2, 1024) and w.sum() > 0
    np.testing.assert_array_equal(t, data.batch(0, 2))
    plain = load_windows("kjv", tok, 1024, 0)
    assert not plain.marks_answers and (plain.example(0, 2)[1] == 1).all()


def test_source_mix_weights_each_window_by_its_own_source(tok, tmp_path):
    """`--data tasks+kjv`: task windows (answer rows marked) and prose windows (every row) in turn, each the
    batch its own source gives at its own step; a '+' that names no source is refused, and a file whose name has
    a '+' is still read as a file."""
    mix = load_windows("tasks+kjv", tok, 1024, 0)
    tasks, prose = load_windows("tasks", tok, 1024, 0), load_windows("kjv", tok, 1024, 0)
    assert isinstance(mix, StepMix) and mix.marks_answers and mix.names == ("tasks", "kjv")
    for step, (src, own) in enumerate([(tasks, 0), (prose, 0), (tasks, 1), (prose, 1)]):
        t, w = mix.example(step, 2)
        t_ref, w_ref = src.example(own, 2)
        np.testing.assert_array_equal(t, t_ref)
        np.testing.assert_array_equal(w, w_ref)
        assert (w == 1).all() if src is prose else 0 < w.sum() < w.size / 10
    with pytest.raises(ValueError, match="joined by"):
        load_windows("tasks++kjv", tok, 1024, 0)
    odd = tmp_path / "a+b.txt"
    odd.write_text("in the beginning " * 2000)
    assert not load_windows(str(odd), tok, 256, 0).marks_answers


def test_prefetch_answers_like_fn_on_one_thread_and_works_ahead():
    """`Prefetch`: every call returns fn(i) (in order, repeated, out of order, after close); fn runs on one
    thread, never twice at once; asking for i queues i+1 .. i+depth; fn's error reaches the caller of that i."""
    import threading
    import time

    from train.data import Prefetch

    calls, threads, active, peak = [], set(), [0], [0]
    ahead = threading.Event()
    lock = threading.Lock()

    def fn(i):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        threads.add(threading.get_ident())
        calls.append(i)
        time.sleep(0.002)
        if i == 2:
            ahead.set()
        with lock:
            active[0] -= 1
        if i == 13:
            raise ValueError("bad window 13")
        return np.full(3, i)

    p = Prefetch(fn, depth=2)
    assert p(0).tolist() == [0, 0, 0]
    assert ahead.wait(5), "fn(1), fn(2) were not computed ahead"
    for i in [1, 2, 3, 3, 7, 8, 4, 100, 101, 5]:
        assert p(i).tolist() == [i] * 3
    with pytest.raises(ValueError, match="bad window 13"):
        p(13)
    assert p(14).tolist() == [14] * 3
    p.close()
    n = len(calls)
    assert p(20).tolist() == [20] * 3 and p(21).tolist() == [21] * 3
    time.sleep(0.05)
    assert calls[n:] == [20, 21], "work ahead after close"
    assert peak[0] == 1 and len(threads) == 1 and threading.get_ident() not in threads


def test_length_mix_cycles_sources_by_step():
    """Step s takes source s % n at its own step s // n: shapes alternate, each source walks its windows in order,
    and the same step always gives the same batch."""
    ids = np.random.default_rng(1).integers(0, 1000, 4096).astype(np.int32)
    short, long = PackedWindows(ids, 32, seed=0), PackedWindows(ids, 64, seed=0)
    mix = StepMix([short, long], (32, 64))
    assert [mix.batch(s, 2).shape for s in range(4)] == [(2, 32), (2, 64), (2, 32), (2, 64)]
    assert [mix.length(s) for s in range(3)] == [32, 64, 32]
    np.testing.assert_array_equal(mix.batch(2, 2), short.batch(1, 2))
    np.testing.assert_array_equal(mix.batch(5, 2), long.batch(2, 2))
    np.testing.assert_array_equal(mix.batch(5, 2, 1, 2), long.batch(2, 2, 1, 2))  # process 1 of 2: its row
    tokens, weights = mix.example(3, 2)
    assert tokens.shape == weights.shape == (2, 64) and not mix.marks_answers


def test_parse_lengths_names_the_flag():
    assert parse_lengths("", "--x", 64) == () and parse_lengths("16,64", "--x", 64) == (16, 64)
    with pytest.raises(ValueError, match="--x lengths must lie in"):
        parse_lengths("16,65", "--x", 64)
    with pytest.raises(ValueError, match="--x must be comma-separated"):
        parse_lengths("16 64", "--x", 64)
