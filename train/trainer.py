"""The reusable training machinery, apart from any objective: distributed init, the (data, model) mesh, Orbax
keep-K checkpoints with exact resume (falling back past a corrupt newest one), the run directory's fingerprint,
metrics.jsonl (rows after the restored step dropped on resume), and the loop with a progress bar, tokens/s and a
stop on a non-finite loss. Stage 1 (`train.distill`) plugs in its step and evaluation; stage 2 plugs in its own.

A step is `step_fn(state, step) -> (state, metrics)` with metrics["loss"] a scalar; `evaluate(step, state)`
returns a dict row (logged at every checkpoint step).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
import time
from typing import Callable

import jax
import numpy as np

from rtpurbo_jax.checkpoint import sync


def log0(*a):
    """print on process 0 only."""
    if jax.process_index() == 0:
        print(*a, flush=True)


def init_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None,
                     skip: bool = False) -> None:
    """jax.distributed.initialize before any device use: explicit coordinator flags, automatic on TPU pods."""
    if skip:
        return
    if coordinator:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    elif os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("CLOUD_TPU_TASK_ID"):
        jax.distributed.initialize()


def make_mesh(spec: str):
    """Mesh (data, model) from 'D,M' (-1 fills with all devices); a smaller mesh uses the first D·M devices."""
    try:
        d, m = (int(x) for x in spec.split(","))
    except ValueError as e:
        raise ValueError(f"--mesh must be 'data,model' sizes like -1,1 or 4,2; got {spec!r}") from e
    n = jax.device_count()
    if d == -1:
        d = n // m
    if m == -1:
        m = n // d
    if d < 1 or m < 1 or d * m > n:
        raise ValueError(f"--mesh {spec} needs {d}x{m} devices but {n} are present")
    auto = jax.sharding.AxisType.Auto  # the frozen backbone runs under GSPMD propagation
    devs = np.asarray(jax.devices()[: d * m]).reshape(d, m)
    return jax.sharding.Mesh(devs, ("data", "model"), axis_types=(auto, auto))


def config_from_argv(cls, argv, prog: str, description: str):
    """A frozen config dataclass `cls` from command-line flags: one flag per field (--snake-case; bools take
    --flag / --no-flag), defaults from the dataclass. A value that starts with "-" and a digit (--mesh -1,1)
    is bound to its flag (argparse would read it as a flag)."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            typ = {"int": int, "float": float}.get(f.type.split(" ")[0], str)
            p.add_argument(flag, type=typ, default=f.default)
    argv = list(sys.argv[1:] if argv is None else argv)
    joined, i = [], 0
    while i < len(argv):
        if argv[i].startswith("--") and "=" not in argv[i] and i + 1 < len(argv) and re.match(r"-\.?\d", argv[i + 1]):
            joined.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            joined.append(argv[i])
            i += 1
    return cls(**vars(p.parse_args(joined)))


def check_fingerprint(run_dir: str, config: dict, keys: tuple[str, ...]) -> None:
    """Refuse a resume whose run-defining settings (`keys` of `config`) differ from those recorded in
    run_dir/config.json, naming each difference."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        return
    try:
        old = json.load(open(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is corrupt ({e}); it records the run being resumed") from e
    diff = [f"--{k.replace('_', '-')} {old[k]!r} -> {config[k]!r}" for k in keys if k in old and old[k] != config[k]]
    if diff:
        raise ValueError(f"--resume of {run_dir} with other flags than the run it continues: {'; '.join(diff)}. "
                         "Repeat the original flags, or start a new --run-dir")


@dataclasses.dataclass(frozen=True)
class RunFlags:
    """The flags every training job shares (its config dataclass derives from this one; `config_from_argv` makes
    one flag per field): the mesh, logging and checkpoint cadence, resume, a preemption stand-in, several hosts."""
    mesh: str = "-1,1"  # data,model sizes; -1 fills
    log_every: int = 10
    ckpt_every: int = 50
    keep: int = 2  # checkpoints kept
    resume: bool = False
    seed: int = 0
    stop_at: int | None = None  # stop after this step (a preemption stand-in; --resume continues)
    skip_distributed: bool = False
    coordinator: str | None = None  # several hosts: --coordinator HOST0:PORT --num-processes N --process-id I
    num_processes: int | None = None
    process_id: int | None = None

    def loop(self, name: str) -> "LoopConfig":
        """The loop's view of these flags (the subclass holds run_dir and steps); name prefixes its logs."""
        return LoopConfig(run_dir=self.run_dir, steps=self.steps, log_every=self.log_every, ckpt_every=self.ckpt_every,
                          keep=self.keep, resume=self.resume, stop_at=self.stop_at, name=name)


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """What the loop needs to know (one config per concern: the objective's flags live elsewhere)."""

    run_dir: str
    steps: int
    log_every: int = 10
    ckpt_every: int = 50
    keep: int = 3
    resume: bool = False
    stop_at: int | None = None
    name: str = "train"  # log prefix and progress-bar label

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.run_dir, "metrics.jsonl")


def open_checkpoints(loop: LoopConfig, state, state_shardings, check_resume: Callable[[], None]):
    """(manager, start step, state): a fresh run, or the newest checkpoint that restores when loop.resume.

    Refuses to start over a directory that already holds checkpoints without --resume. check_resume() runs
    before a restore (the fingerprint check)."""
    import orbax.checkpoint as ocp

    mngr = ocp.CheckpointManager(os.path.abspath(os.path.join(loop.run_dir, "checkpoints")),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=loop.keep,
                                                                      save_interval_steps=loop.ckpt_every))
    if loop.resume and mngr.latest_step() is not None:
        check_resume()
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state,
                                state_shardings)
        start, state = restore_latest_good(mngr, abstract, loop.run_dir, loop.name)
        log0(f"[{loop.name}] resumed from step {start}")
        return mngr, start, state
    if mngr.latest_step() is not None:
        raise FileExistsError(f"{loop.run_dir}/checkpoints already holds step {mngr.latest_step()}; pass --resume "
                              "to continue it or choose another --run-dir")
    return mngr, 0, state


def restore_latest_good(mngr, abstract, run_dir: str, name: str = "train"):
    """(step, state) of the newest checkpoint that restores. One that does not (a crash or a disk error while it
    was written) is moved to RUN_DIR/corrupt_checkpoints/<step> — kept, not deleted — and the next older one is
    tried (the manager keeps --keep of them)."""
    import orbax.checkpoint as ocp

    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            return step, mngr.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as e:  # noqa: BLE001 - any failure to read a checkpoint means: try the older one
            dest = os.path.join(run_dir, "corrupt_checkpoints", str(step))
            log0(f"[{name}] checkpoint {step} cannot be restored ({type(e).__name__}: {str(e)[:160]}); "
                 f"moved to {dest}, trying an older one")
            if jax.process_index() == 0:
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                shutil.move(os.path.join(os.fspath(mngr.directory), str(step)), dest)
            sync(f"rtpurbo-corrupt-{step}")
            mngr.reload()
    raise ValueError(f"no checkpoint under {run_dir}/checkpoints can be restored; start a new --run-dir")


def write_run_config(loop: LoopConfig, config: dict, start: int) -> None:
    """Process 0: record config.json and trim metrics.jsonl to the rows up to `start` (all of them go when a run
    starts from step 0)."""
    if jax.process_index() != 0:
        return
    with open(os.path.join(loop.run_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    path = loop.metrics_path
    if start == 0 and os.path.exists(path):
        os.remove(path)
    elif os.path.exists(path):  # a resume: drop rows logged after the restored checkpoint
        kept = [line for line in open(path) if line.strip() and json.loads(line)["step"] <= start]
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)


def first_metrics_row(loop: LoopConfig, start: int) -> dict | None:
    """The step-0 evaluation row of a resumed run (so "before" stays the run's own), or None."""
    if not start or not os.path.exists(loop.metrics_path):
        return None
    row = json.loads(open(loop.metrics_path).readline())
    return row if row.get("step") == 0 else None


def run_loop(loop: LoopConfig, state, mngr, start: int, step_fn: Callable, evaluate: Callable,
             tokens_per_step: int | Callable[[int], int], rows: list[dict] | None = None):
    """Steps start..loop.steps (or loop.stop_at): step, save (the manager keeps every ckpt_every-th), log every
    log_every steps (loss, grad_norm if given, tokens/s of the steps after the first on the bar), evaluate at checkpoint steps, append rows to
    metrics.jsonl. A non-finite loss stops the run before it is saved, naming the last good checkpoint.
    tokens_per_step: an int, or step -> int where steps differ (stage 1's --length-mix).
    Returns (state, stopped early)."""
    import orbax.checkpoint as ocp
    from tqdm import tqdm

    rows = list(rows or [])
    bar = tqdm(range(start, loop.steps), disable=jax.process_index() != 0, desc=loop.name, dynamic_ncols=True)
    busy, toks = 0.0, 0  # tokens/s of the steps themselves: the first (compiling) step, evaluation and
    for step in bar:     # checkpoint writes are not counted
        if loop.stop_at is not None and step >= loop.stop_at:
            log0(f"[{loop.name}] stopping at step {step} (--stop-at); continue with --resume")
            break
        t_step = time.time()
        state, m = step_fn(state, step)
        loss = float(m["loss"])  # waits for the step
        dt = time.time() - t_step
        n_tok = tokens_per_step(step) if callable(tokens_per_step) else tokens_per_step
        if step > start:
            busy, toks = busy + dt, toks + n_tok
        if not np.isfinite(loss):  # stop before saving it: the last checkpoint stays the last good one
            raise ValueError(f"non-finite loss at step {step + 1}; the last good checkpoint is step "
                             f"{mngr.latest_step()} in {loop.run_dir}/checkpoints (lower --lr or --grad-clip, then "
                             "--resume)")
        if (step + 1) % loop.log_every == 0 or step + 1 == loop.steps:
            row = {"step": step + 1, **{k: float(v) for k, v in m.items()}, "tokens_per_s": toks / busy if busy else n_tok / dt}
            rows.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
        mngr.save(step + 1, args=ocp.args.StandardSave(state))
        if (step + 1) % loop.ckpt_every == 0 or step + 1 == loop.steps:
            rows.append(evaluate(step + 1, state))
        if jax.process_index() == 0:
            with open(loop.metrics_path, "a") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
        rows = []
    mngr.wait_until_finished()
    return state, bool(loop.stop_at is not None and loop.stop_at < loop.steps)


def plot_curves(rows: list[dict], path: str, eval_keys: dict[str, str], loss_label: str = "loss",
                ylim: tuple[float, float] | None = None) -> None:
    """PNG: the training loss per logged step (left) and evaluation metrics `eval_keys` {key: label} (right,
    within `ylim` when given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    train = [r for r in rows if "grad_norm" in r]
    ax[0].plot([r["step"] for r in train], [r["loss"] for r in train])
    ax[0].set(xlabel="step", ylabel=loss_label, yscale="log" if all(r["loss"] > 0 for r in train) else "linear")
    for key, label in eval_keys.items():
        ev = [r for r in rows if key in r]
        if ev:
            ax[1].plot([r["step"] for r in ev], [r[key] for r in ev], marker="o", label=label)
    ax[1].set(xlabel="step", **({} if ylim is None else {"ylim": ylim}))
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_metrics(loop: LoopConfig) -> list[dict]:
    """Every row of metrics.jsonl (empty when there is none)."""
    path = loop.metrics_path
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


__all__ = ["LoopConfig", "RunFlags", "check_fingerprint", "config_from_argv", "first_metrics_row", "init_distributed",
           "log0", "make_mesh", "open_checkpoints", "plot_curves", "read_metrics", "restore_latest_good", "run_loop",
           "sync", "write_run_config"]
