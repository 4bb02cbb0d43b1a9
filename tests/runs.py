"""Helpers for the tests that run whole training jobs (stage 1, stage 2): the losses a run logged."""

import json
import os

import numpy as np


def losses(run_dir) -> dict[int, float]:
    """{step: training loss} from a run's metrics.jsonl (the step rows, not the evaluation rows)."""
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "grad_norm" in r}


def assert_same_losses(reference_dir, other_dir, steps: int, rtol: float) -> None:
    """The two runs logged the same losses at steps 1..steps (within rtol)."""
    a, b = losses(reference_dir), losses(other_dir)
    np.testing.assert_allclose([b[s] for s in range(1, steps + 1)], [a[s] for s in range(1, steps + 1)], rtol=rtol)
