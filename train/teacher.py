"""Stage 2's teacher: the dense model's top-k logits cached offline, and the loss against them (RTPurbo eq. 7).

Cache layout (RUN_DIR/teacher/): one `shard_<first step>.npz` per `steps_per_shard` training steps holding
ids int32 [steps, B, T, k] and logits float16 [steps, B, T, k] of the dense model on exactly the batches those
steps train on (`train.data` windows are deterministic per step), plus `meta.json` (model source, data, shapes,
k, processes). With several processes each one caches its own rows of every batch (B / processes of them) in
`shard_<first step>.p<process>.npz`, so hosts need not share a disk. Shards are written to a temporary name
(never ending in .npz) and renamed, so a killed build leaves only whole shards; a rebuild skips them (resumable) and refuses a cache
made for other settings.

Loss (eq. 7): per position, forward KL between softmax of the teacher's top-k logits and the softmax of the
student's logits at the same k ids (both renormalised over the k ids), averaged over the positions of `mask`.
It leaves the student free to move probability off the teacher's top-k. `topk_tail_kl_at` (stage 2's
`--loss topk_tail`) adds the rest of the vocabulary as one more outcome; its cache also holds the teacher's
logsumexp over the vocabulary, `lse` float32 [steps, B, T], and its meta.json says `"tail": true`.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def _masked_mean(x, mask=None):
    """Mean of x [B, T] over the positions where mask [B, T] is True (all without a mask)."""
    if mask is None:
        return x.mean()
    m = mask.astype(jnp.float32)
    return (x * m).sum() / jnp.maximum(m.sum(), 1.0)


def teacher_topk(logits, k: int):
    """(ids int32 [..., k], logits fp32 [..., k]): the k largest logits of fp32 [..., V], descending."""
    vals, ids = jax.lax.top_k(logits.astype(jnp.float32), k)
    return ids.astype(jnp.int32), vals


def topk_kl(student_logits, t_ids, t_logits, mask=None):
    """Mean over positions (where mask [B, T] is True; all without one) of KL(p_t || q_s) with
    p_t = softmax(t_logits [B, T, k]) and q_s = softmax(student_logits [B, T, V] at t_ids [B, T, k])."""
    return topk_kl_at(jnp.take_along_axis(student_logits.astype(jnp.float32), t_ids, axis=-1), t_logits, mask)


def topk_kl_at(student_at_ids, t_logits, mask=None):
    """`topk_kl` from the student's logits at the teacher's k ids only, fp32 [B, T, k] (`model.logits_at`: the
    training step never builds the [B, T, V] logits)."""
    log_p = jax.nn.log_softmax(t_logits.astype(jnp.float32), -1)
    kl = (jnp.exp(log_p) * (log_p - jax.nn.log_softmax(student_at_ids.astype(jnp.float32), -1))).sum(-1)  # [B, T]
    return _masked_mean(kl, mask)


def topk_tail_kl_at(student_at_ids, student_lse, t_logits, t_lse, mask=None):
    """Eq. 7 with one more outcome, "any token outside the teacher's top k": mean over positions (where mask
    [B, T] is True) of the forward KL over k + 1 outcomes between the teacher's probabilities — its top-k
    logits fp32 [B, T, k] against its logsumexp over the whole vocabulary [B, T] — and the student's (its logits
    at those ids [B, T, k], its logsumexp [B, T]: `model.lse_from_hidden`). Zero when the student's
    distribution is the teacher's; unlike `topk_kl_at`, positive when the student moves mass off the top k."""
    log_p = t_logits.astype(jnp.float32) - t_lse.astype(jnp.float32)[..., None]
    log_q = student_at_ids.astype(jnp.float32) - student_lse.astype(jnp.float32)[..., None]

    def log_rest(lp):  # log(1 - sum_k exp(lp)): the mass outside the k ids (floored: cached fp16 logits round)
        return jnp.log(jnp.maximum(-jnp.expm1(jnp.minimum(jax.nn.logsumexp(lp, -1), 0.0)), 1e-12))

    lr_p, lr_q = log_rest(log_p), log_rest(log_q)
    kl = (jnp.exp(log_p) * (log_p - log_q)).sum(-1) + jnp.exp(lr_p) * (lr_p - lr_q)  # [B, T]
    return _masked_mean(kl, mask)


def rest_mass_at(student_at_ids, student_lse, mask=None):
    """Mean over positions of the student's probability outside the teacher's top-k ids: 1 - sum of
    softmax over the vocabulary at those ids (logits at them fp32 [B, T, k], logsumexp [B, T])."""
    inside = jnp.exp(jax.nn.logsumexp(student_at_ids.astype(jnp.float32), -1) - student_lse.astype(jnp.float32))
    return _masked_mean(1.0 - inside, mask)


def topk_agreement(student_logits, t_ids, mask=None):
    """Mean fraction of the teacher's top-k ids [B, T, k] that are also in the student's top-k."""
    _, s_ids = jax.lax.top_k(student_logits.astype(jnp.float32), t_ids.shape[-1])
    return topk_agreement_ids(s_ids, t_ids, mask)


def topk_agreement_ids(s_ids, t_ids, mask=None):
    """`topk_agreement` from the student's own top-k ids int [B, T, k] (`model.topk_from_hidden`)."""
    hit = (s_ids[..., :, None] == t_ids[..., None, :]).any(-2).mean(-1)  # [B, T]
    return _masked_mean(hit, mask)


def top1_within_topk(student_logits, t_ids, mask=None):
    """Mean over positions of: the student's best among the teacher's top-k ids [B, T, k] is the teacher's top-1
    (what eq. 7 constrains; the overlap `topk_agreement` also depends on logits outside the teacher's top-k,
    which the loss leaves free)."""
    return top1_within_topk_at(jnp.take_along_axis(student_logits.astype(jnp.float32), t_ids, axis=-1), mask)


def top1_within_topk_at(student_at_ids, mask=None):
    """`top1_within_topk` from the student's logits at the teacher's (descending) top-k ids, [B, T, k]."""
    hit = (jnp.argmax(student_at_ids, -1) == 0).astype(jnp.float32)
    return _masked_mean(hit, mask)


class TeacherCache:
    """Top-k teacher logits for steps 0..steps-1 under `root`, built once by `build` and read per step."""

    def __init__(self, root: str, meta: dict, steps_per_shard: int = 16):
        self.root, self.meta, self.per = root, dict(meta, steps_per_shard=steps_per_shard), steps_per_shard
        self._loaded: tuple[int, dict] | None = None

    def _path(self, first: int) -> str:
        proc = f".p{jax.process_index()}" if jax.process_count() > 1 else ""
        return os.path.join(self.root, f"shard_{first:08d}{proc}.npz")

    def check_meta(self) -> None:
        """Write meta.json, or refuse an existing cache made for other settings (naming them)."""
        os.makedirs(self.root, exist_ok=True)
        path = os.path.join(self.root, "meta.json")
        if os.path.exists(path):
            old = json.load(open(path))
            diff = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in self.meta.items() if old.get(k) != v]
            if diff:
                raise ValueError(f"{self.root} holds teacher logits for other settings ({'; '.join(diff)}); "
                                 "use another --run-dir")
            return
        tmp = f"{path}.tmp{jax.process_index()}"  # processes sharing a disk write the same content, each its own tmp
        with open(tmp, "w") as f:
            json.dump(self.meta, f, indent=1)
        os.replace(tmp, path)

    def build(self, steps: int, batch_fn: Callable[[int], np.ndarray], topk_fn: Callable,
              log=print, to_local: Callable = np.asarray, args: tuple = ()) -> int:
        """Compute the missing shards. batch_fn(step) -> tokens int [B, T] (the global batch); topk_fn(tokens,
        *args) -> the teacher's (ids int32, logits fp32) [B, T, k], descending (stage 2: `model.topk_from_hidden`,
        without the whole [B, T, V]; or `teacher_topk` of logits; pass arrays such as params in `args`: a jit may
        not close over arrays spread over several processes); to_local(x) -> this process's rows of a global
        result (all in one process). Every process runs the teacher on the global batch and writes its own rows.
        Returns the bytes of this process's shards on disk."""
        from tqdm import tqdm

        self.check_meta()
        topk = jax.jit(topk_fn)
        missing = [not os.path.exists(self._path(f)) for f in range(0, steps, self.per)]
        if jax.process_count() > 1:  # every process takes part in every teacher step: agree on what is missing
            from jax.experimental import multihost_utils

            missing = np.asarray(multihost_utils.process_allgather(np.asarray(missing))).any(0).tolist()
        firsts = [f for f, m in zip(range(0, steps, self.per), missing) if m]
        bar = tqdm(total=sum(min(self.per, steps - f) for f in firsts), desc="teacher top-k",
                   disable=jax.process_index() != 0 or not firsts)
        for first in firsts:
            ids, vals, lse = [], [], []
            for step in range(first, min(first + self.per, steps)):
                i, v, *rest = topk(batch_fn(step), *args)
                ids.append(np.asarray(to_local(i), np.int32))
                vals.append(np.asarray(to_local(v), np.float16))
                lse += [np.asarray(to_local(r), np.float32) for r in rest]
                bar.update(1)
            if bool(lse) != bool(self.meta.get("tail")):
                raise ValueError("topk_fn must return the teacher's logsumexp as a third output exactly when the "
                                 "cache's meta says tail")
            # the tmp name must not end in .npz: other processes list the folder while this one writes
            tmp = self._path(first) + ".tmp"
            with open(tmp, "wb") as f:
                np.savez(f, ids=np.stack(ids), logits=np.stack(vals), **({"lse": np.stack(lse)} if lse else {}))
            os.replace(tmp, self._path(first))
        bar.close()
        size = sum(os.path.getsize(self._path(f)) for f in range(0, steps, self.per))  # this process's shards only
        procs = jax.process_count()
        log(f"[stage2] teacher top-{self.meta.get('top_k', 'k')} logits for {steps} steps: {size / 2**20:.1f} MiB in {self.root}"
            + (f" (this process's rows; {procs} processes)" if procs > 1 else "") + ("" if firsts else " (cached)"))
        return size

    def get(self, step: int) -> tuple[np.ndarray, ...]:
        """(ids int32 [b, T, k], logits fp32 [b, T, k]) of training step `step`: this process's b rows; with a
        tail cache also (lse fp32 [b, T])."""
        first = step - step % self.per
        if self._loaded is None or self._loaded[0] != first:
            with np.load(self._path(first)) as z:
                self._loaded = (first, {k: z[k] for k in z.files})
        d, j = self._loaded[1], step - first
        return (d["ids"][j], d["logits"][j].astype(np.float32)) + ((d["lse"][j],) if "lse" in d else ())
