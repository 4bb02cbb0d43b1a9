"""Two stage-2 processes on localhost (jax.distributed, 2 CPU devices each, each reading its own half of every
batch and caching its own rows of the teacher's top-k) give the losses of one process with 4 devices, and
export one converted model (written collectively into a shared run directory)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from tests.test_distill_multiprocess import ROOT, _env, run_two_processes
from tests.runs import losses
import tests.test_stage2 as _stage2

flags, tiny = _stage2.flags, _stage2.tiny  # tiny: a module fixture


def _cmd(tiny, run_dir, *extra):
    # the last --mesh wins: every device of the run on the data axis
    return [sys.executable, "-m", "train.distill", "--stage", "2",
            *flags(tiny, run_dir, "--steps", "3", "--batch", "4", "--mesh=-1,1", *extra)]


def test_two_processes_match_one(tiny, tmp_path):
    from rtpurbo_jax.checkpoint import load_converted

    one = tmp_path / "one"
    subprocess.run(_cmd(tiny, one, "--skip-distributed"), cwd=ROOT, env=_env(4), check=True, capture_output=True,
                   timeout=600)
    two = tmp_path / "two"
    run_two_processes(_cmd(tiny, two)[1:])
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    # step 1 runs on the same weights: only the forward's reduction order differs. Later steps follow AdamW
    # updates whose first steps are ~lr * sign(g), so gradients equal up to summation order can move a weight
    # whose gradient is near zero either way; the tolerance is well below what training moves the loss by.
    assert abs(a[1] - b[1]) <= 1e-5 * max(1.0, abs(a[1])), (a[1], b[1])
    moved = abs(a[3] - a[1])
    for step in (2, 3):
        assert abs(a[step] - b[step]) <= 5e-4 * max(1.0, abs(a[step])) < moved / 10, (step, a[step], b[step], moved)
    shards = sorted(os.listdir(two / "teacher"))
    assert any(f.endswith(".p0.npz") for f in shards) and any(f.endswith(".p1.npz") for f in shards), shards
    # the exported weights: trained (far from the start) and the same as one process's, up to the summation
    # order of the sharded reductions that AdamW's first steps amplify
    start = load_converted(tiny[1]).params["layers"]["wq"]
    m1, m2 = (np.asarray(load_converted(str(d / "model")).params["layers"]["wq"]) for d in (one, two))
    moved = np.abs(m1 - np.asarray(start))
    assert moved.max() > 1e-3
    # AdamW's first steps are ~lr * sign(g): a weight whose gradient is ~0 moves either way in either run (a few
    # percent of them, by up to half a step); the rest agree. Gradients from half of each batch would flip many.
    diff = np.abs(m2 - m1)
    assert (diff > 1e-4).mean() < 0.1 and diff.mean() < 0.05 * moved.mean(), ((diff > 1e-4).mean(), diff.mean())
    assert not any(n.endswith(".tmp-collective") for n in os.listdir(two))
