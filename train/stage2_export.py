"""The end of a stage-2 run: which step's weights become `RUN_DIR/model/`, how that model is served, and the
warnings its held-out rows call for. Pure decisions over the run's evaluation rows and flags, plus the write.

- `pick_export`: `--export last` (the last step) or `best` (the lowest held-out objective among the weights at
  hand: the start, the kept checkpoints, the last step; `best_export_step`).
- `write_model`: a converted checkpoint with the same roles, its `seqlen_threshold` from `export_threshold` — 0,
  sparse at every length, unless `--dense-weight` trained the dense path too or `--serve-threshold` says otherwise.
- `regression_note` / `drift_note`: the held-out KL rose on the loss rows / on all rows.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import jax

from rtpurbo_jax.checkpoint import save_converted
from rtpurbo_jax.model_config import ModelConfig
from rtpurbo_jax.sparse_config import SparseConfig


def export_threshold(c, shipped: int) -> int:
    """The exported model's `seqlen_threshold` (c: a `train.stage2.Stage2Config`): --serve-threshold when given;
    else 0 (sparse at every length: the path the weights were trained on) unless --dense-weight > 0 kept the dense
    path in the objective (`shipped`, the converted model's)."""
    if c.serve_threshold is not None:
        return c.serve_threshold
    return shipped if c.dense_weight > 0 else 0


def best_export_step(evals: list[dict], available: set[int], key: str = "kl") -> int:
    """The step whose held-out `key` (the loss trained: "kl", or "kl_tail") is lowest among evaluation rows
    {"step", key, ...} whose weights are at hand (`available`: the start, the kept checkpoints, the last step); the
    earliest on a tie."""
    return min((r for r in evals if r["step"] in available), key=lambda r: (r[key], r["step"]))["step"]


def pick_export(c, evals: dict[int, dict], state: dict, mngr, objective: str, load_start: Callable[[], dict],
                log: Callable[[str], None]) -> tuple[int, dict]:
    """(step, params in the masters' dtypes and shardings) to export: the last step's (`state["params"]`), or for
    --export best `best_export_step` over `evals` {step: row} — the start through `load_start()`, another kept
    checkpoint restored from `mngr` (an Orbax CheckpointManager)."""
    step_out, params = c.steps, state["params"]
    if c.export != "best":
        return step_out, params
    step_out = best_export_step(list(evals.values()), {0, c.steps, *mngr.all_steps()}, objective)
    if step_out == 0:  # the model as it came
        params = load_start()
    elif step_out != c.steps:
        import orbax.checkpoint as ocp

        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        params = mngr.restore(step_out, args=ocp.args.StandardRestore(abstract))["params"]
    log(f"[stage2] --export best: step {step_out} (held-out {objective} {evals[step_out][objective]:.4f})")
    return step_out, params


def write_model(c, params: dict, cfg: ModelConfig, shipped: SparseConfig, name: str, tokenizer, step_out: int,
                log: Callable[[str], None]) -> str:
    """Write `params` (the model's dtypes) to RUN_DIR/model/ with the roles of `shipped` and `export_threshold`'s
    seqlen_threshold (said in the log when it changes); its path. Collective over processes (each writes its part)."""
    out = os.path.join(c.run_dir, "model")
    n = export_threshold(c, shipped.seqlen_threshold)
    if n != shipped.seqlen_threshold:
        log(f"[stage2] the exported model's seqlen_threshold is {n} ({shipped.seqlen_threshold} before): "
            f"{'calls of every length' if n == 0 else f'calls of {n} tokens or more'} are served sparse, the path "
            "its weights were trained on (--serve-threshold sets it)")
    served = dataclasses.replace(shipped, seqlen_threshold=n)
    save_converted(out, params, cfg, sparse_config=served.to_dict(), source=c.model, tokenizer=tokenizer,
                   overwrite=os.path.exists(out),
                   extra={"model_name": name, "stage2": {"from": os.path.abspath(c.model),
                                                         "indexer": os.path.abspath(c.indexer), "steps": c.steps,
                                                         "exported_step": step_out}})
    return out


def regression_note(before: dict, after: dict) -> str | None:
    """A warning when the run left the student further from the teacher on the held-out rows than it started
    (the exported model is still the last step's); None otherwise."""
    if after["kl"] <= before["kl"]:
        return None
    return (f"the held-out KL rose from {before['kl']:.4f} to {after['kl']:.4f} (top-10 agreement "
            f"{before['topk_agreement']:.3f} -> {after['topk_agreement']:.3f}): the exported model is further from "
            "the dense one than the model it started from. Check it with benchmarks.accuracy before using it; "
            "--export best exports the step with the lowest held-out KL; a larger global batch (--accumulate), "
            "longer windows or fewer steps may help.")


def drift_note(before: dict, after: dict, mixed: bool = False) -> str | None:
    """A warning when the loss covered answer rows only and the held-out KL over *all* rows rose: the rows the loss
    leaves out drifted from the dense model (on Qwen2.5-0.5B, 16K task windows: answer-row KL 0.0073 -> 0.0032,
    all rows 0.0216 -> 0.0241, perplexity +2-3%). `mixed`: the data already mixes in a source trained on every row
    (`--data A+B`), so the advice is another one. None otherwise."""
    if after["kl_all_rows"] <= before["kl_all_rows"]:
        return None
    advice = ("Prose already in the mix did not hold it; --dense-weight 1 (the dense student's loss beside the sparse "
              "one), a smaller --lr or fewer --steps may" if mixed else
              "Mixing in prose, whose every row is trained (--data tasks+kjv), or --positions all keeps it in the "
              "objective; --dense-weight 1 anchors the dense path too")
    return (f"the held-out KL over all rows rose from {before['kl_all_rows']:.4f} to {after['kl_all_rows']:.4f} "
            f"while the loss covered only the answer rows of the windows that mark them (the loss rows' KL "
            f"{before['kl']:.4f} -> {after['kl']:.4f}): the rest of the model drifted from the dense one (perplexity "
            f"may be worse). {advice}.")
