"""The benchmark's closed-form device plans against the library's band plans and the plan contract."""

import numpy as np
import pytest

from benchmarks.prefill_plans import band_plan_device, layer_plan
from pallas_kernels.block_plan import FULL_WINDOW, band_plan, cdiv, selection_from_plan


@pytest.mark.parametrize("t,qb,kb,sinks,window", [(1000, 128, 64, 4, 300), (1024, 128, 128, 0, FULL_WINDOW),
                                                   (777, 64, 64, 70, 129), (512, 128, 128, 4, 8192)])
def test_density_one_equals_band_plan(t, qb, kb, sinks, window):
    n = 3
    plan, visited = band_plan_device(t, qb=qb, kb=kb, sinks=np.full(n, sinks), window=np.full(n, window),
                                     density=np.ones(n))
    ref = band_plan(1, n, t, t, sinks=sinks, window=window, q_block=qb, kv_block=kb)
    sb = cdiv(t, kb)
    np.testing.assert_array_equal(selection_from_plan(plan, sb), selection_from_plan(ref, sb))
    np.testing.assert_array_equal(plan.counts, ref.counts)
    assert visited == int(ref.counts.sum())


def test_random_rows_are_ascending_causal_and_keep_the_diagonal():
    plan, visited = layer_plan("random", 4096, 4, qb=128, kb=64, density=0.1, seed=3)
    blocks, counts = np.asarray(plan.kv_blocks[0]), np.asarray(plan.counts[0])
    tb = blocks.shape[1]
    for n in range(4):
        for t in range(tb):
            row = blocks[n, t, :counts[n, t]]
            diag = min((t * 128 + 127) // 64, 4096 // 64 - 1)
            assert row[-1] == diag and np.all(np.diff(row) > 0) and row[0] >= 0
            assert np.all(blocks[n, t, counts[n, t]:] == row[-1])
            assert counts[n, t] == diag // 10 + 1
    assert visited == counts.sum()
    assert 0.08 < visited / (4 * sum(min((t * 128 + 127) // 64, 63) + 1 for t in range(tb))) < 0.2


def test_mix_has_retrieval_heads_dense_and_local_heads_banded():
    plan, _ = layer_plan("mix", 2048, 8, qb=128, kb=64, retrieval=2, window=256, sinks=4)
    window = np.asarray(plan.window)
    assert (window == FULL_WINDOW).sum() == 2 and (window == 256).sum() == 6
    assert np.all(np.asarray(plan.sinks)[window == FULL_WINDOW] == 0)
    counts = np.asarray(plan.counts[0])
    assert np.all(counts[window == FULL_WINDOW, -1] == 32) and np.all(counts[window == 256, -1] <= 7)
