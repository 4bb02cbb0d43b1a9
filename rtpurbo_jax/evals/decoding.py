"""Batched decoding through the public serving API (`prefill`, then `decode_step` with stats), and the
needle-in-a-haystack accuracy `train.distill` reports before and after training."""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from rtpurbo_jax.kv_cache import init_cache
from rtpurbo_jax.serving import decode_step, prefill
from rtpurbo_jax.sparse_config import SparseConfig


def prefill_config(s: SparseConfig | None) -> SparseConfig | None:
    """The config a prefill runs with: retrieval heads dense (the paper) unless prefill_mode is "indexer"."""
    return s if s is None or s.prefill_mode == "indexer" else dataclasses.replace(s, top_p=1.0, selector="indexer",
                                                                                  max_blocks=None)


def run_batch(params, cfg, sparse: SparseConfig | None, indexer, tokens: np.ndarray, lengths: np.ndarray,
              max_len: int, steps: int, forced: np.ndarray | None = None, cache=None):
    """Prefill (unless `cache` = (logits, cache) from an earlier call is given) then `steps` decode steps, greedy
    or teacher-forced by `forced` int [B, steps]. sparse None: full attention over a dense cache.

    Returns (generated int [B, steps], nll fp64 [B] of `forced`, mean blocks_frac (None without retrieval
    heads), the (logits, cache) after prefill for reuse)."""
    dsp = None if sparse is None else dataclasses.replace(sparse, prefill_mode="dense")
    if cache is None:
        psp = prefill_config(sparse)
        cache = init_cache(cfg, tokens.shape[0], max_len, psp, params["embed"].dtype)
        logits, cache = prefill(params, cache, jnp.asarray(tokens), jnp.asarray(lengths), indexer, cfg=cfg, sparse=psp)
        keep = (logits, jax.tree.map(jnp.copy, cache))
    else:
        keep = cache
        logits, cache = cache[0], jax.tree.map(jnp.copy, cache[1])
    out, nll, fracs = [], np.zeros(tokens.shape[0]), []
    for i in range(steps):
        nxt = jnp.argmax(logits, -1).astype(jnp.int32) if forced is None else jnp.asarray(forced[:, i])
        if forced is not None:
            nll -= np.asarray(jax.nn.log_softmax(logits, -1)[jnp.arange(len(nxt)), nxt], np.float64)
        out.append(np.asarray(nxt))
        if i + 1 < steps:
            logits, cache, st = decode_step(params, cache, nxt, indexer, cfg=cfg, sparse=dsp, stats=True)
            fracs.append(np.asarray(st["blocks_frac"]))
    frac = float(np.mean(fracs)) if fracs and sparse is not None and sparse.roles_array.any() else None
    return np.stack(out, 1), nll, frac, keep


def needle_accuracy(params, cfg, tok, runs: dict, *, length: int, prompts: int, seed: int, depth=None,
                    log=print) -> dict:
    """Needle-in-a-haystack accuracy (`tasks` niah_single_prose, held-out text, `length` tokens, `prompts`
    prompts, needles at `depth` (`tasks.make_prompt`), 12 greedy tokens) per run: runs = {name: (SparseConfig
    or None for full attention, indexer)}. Returns {name: {accuracy 0..1, blocks_frac}}."""
    from rtpurbo_jax.evals.tasks import Builder, make_prompt, score

    b = Builder(tok)
    ps = [make_prompt(tok, "niah_single_prose", length, i, seed + 11, b, depth) for i in range(prompts)]
    toks = np.stack([p.tokens for p in ps])
    lengths = np.full((len(ps),), length, np.int32)
    out = {}
    for name, (sparse, ix) in runs.items():
        log(f"needle check, {name}: {prompts} prompts of {length} tokens through serving (compiles prefill and "
            f"decode first)")
        t0 = time.time()
        gen, _, frac, _ = run_batch(params, cfg, sparse, ix, toks, lengths, length + 16, 12)
        acc = float(np.mean([score(tok.decode(list(g)), p.answers) for g, p in zip(gen, ps)])) / 100
        out[name] = {"accuracy": acc, "blocks_frac": frac}
        log(f"needle accuracy at {length} tokens, {name}: {acc:.2f}"
            + ("" if frac is None else f", blocks {frac:.3f}") + f" ({time.time() - t0:.0f}s)")
    return out
