"""Two stage-2 processes on localhost (jax.distributed, 2 CPU devices each, each reading its own half of every
batch and caching its own rows of the teacher's top-k) give the losses of one process with 4 devices, and
export one converted model (written collectively into a shared run directory)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from tests.test_distill_multiprocess import ROOT, _env, run_two_processes
from tests.test_stage2 import flags, losses, tiny  # noqa: F401  (module fixture)


def _cmd(tiny, run_dir, *extra):  # noqa: F811
    # the last --mesh wins: every device of the run on the data axis
    return [sys.executable, "-m", "train.distill", "--stage", "2",
            *flags(tiny, run_dir, "--steps", "3", "--batch", "4", "--mesh=-1,1", *extra)]


def test_two_processes_match_one(tiny, tmp_path):  # noqa: F811
    from rtpurbo_jax.checkpoint import load_converted

    one = tmp_path / "one"
    subprocess.run(_cmd(tiny, one, "--skip-distributed"), cwd=ROOT, env=_env(4), check=True, capture_output=True,
                   timeout=600)
    two = tmp_path / "two"
    run_two_processes(_cmd(tiny, two)[1:])
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5 * max(1.0, abs(a[step])), (step, a[step], b[step])
    shards = sorted(os.listdir(two / "teacher"))
    assert any(f.endswith(".p0.npz") for f in shards) and any(f.endswith(".p1.npz") for f in shards), shards
    # the exported weights: trained (far from the start) and the same as one process's, up to the summation
    # order of the sharded reductions that AdamW's first steps amplify
    start = load_converted(tiny[1]).params["layers"]["wq"]
    m1, m2 = (np.asarray(load_converted(str(d / "model")).params["layers"]["wq"]) for d in (one, two))
    assert np.abs(m2 - np.asarray(start)).max() > 1e-3
    np.testing.assert_allclose(m2, m1, atol=1e-4)
    assert not any(n.endswith(".tmp-collective") for n in os.listdir(two))
