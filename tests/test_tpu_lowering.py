"""The whole stack lowers for TPU from this CPU host (no TPU is lent here): `jax.export(..., platforms=["tpu"])`
of the stage-1 and stage-2 training steps on an 8-device (data, model) mesh, and of serving's prefill chunk and
decode step with the Mosaic TPU kernels, at the Llama-3.1-8B layer shape with a 1M-token cache.

Lowering proves the programs trace, shard and emit Mosaic TPU kernels for these shapes; it does not prove they
compile or fit on a TPU (a whole 1M-token plan in scalar memory does not: the streamed-plan kernels of the TPU
issue are not written yet). Layers are cut to 4 (every layer has the same shapes; their role splits differ).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

from rtpurbo_jax import serving
from rtpurbo_jax.indexer import init_indexer
from rtpurbo_jax.kv_cache import init_cache
from rtpurbo_jax.model_config import LLAMA3_8B
from rtpurbo_jax.params import abstract_params, param_shardings
from rtpurbo_jax.sparse_config import SparseConfig

CFG = dataclasses.replace(LLAMA3_8B, num_layers=4)
MESH = AbstractMesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


@pytest.fixture(scope="module")
def sparse():
    roles = np.random.default_rng(0).random((CFG.num_layers, CFG.num_heads)) < 0.15
    return SparseConfig(roles=roles.astype(int).tolist(), window=8192, sinks=4, seqlen_threshold=0, top_p=0.9)


def _sharded_for(exp, n_devices: int) -> None:
    assert exp.platforms == ("tpu",) and exp.nr_devices == n_devices
    assert "mhlo.sharding" in exp.mlir_module() or "sdy.sharding" in exp.mlir_module()


def test_stage1_step_lowers_for_tpu_on_a_mesh(sparse):
    from train.distill import build_step
    from train.objective import init_rows

    heads = np.argwhere(sparse.roles_array).astype(np.int32)
    rep = NamedSharding(MESH, P())
    train0 = jax.eval_shape(lambda: init_rows("random", heads, CFG, 16, jax.random.key(0), None, local_prior=True))
    train_sh = jax.tree.map(lambda _: NamedSharding(MESH, P("model" if len(heads) % 2 == 0 else None)), train0)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.01))
    opt0 = jax.eval_shape(tx.init, train0)
    state_sh = {"params": train_sh, "opt_state": jax.tree.map(lambda _: rep, opt0)}
    loss_kw = dict(level="block", weight="longrange", kv_block=64, sinks=4, recent=64)
    # the frozen forward's attention through the Mosaic TPU kernel per shard (`shard_map`), as training runs it
    step_j, _ = build_step(CFG, heads, tx, 256, (state_sh, param_shardings(CFG, MESH), NamedSharding(MESH, P("data")),
                                                  rep), loss_kw, "mosaic_tpu", MESH)
    exp = jax.export.export(step_j, platforms=["tpu"])({"params": train0, "opt_state": opt0},
                                                       abstract_params(CFG, jnp.bfloat16),
                                                       jax.ShapeDtypeStruct((4, 8192), jnp.int32))
    _sharded_for(exp, 8)
    assert "tpu_custom_call" in exp.mlir_module()  # the kernel, not the jnp reference


@pytest.mark.parametrize("loss,dense_weight", [("topk", 0.0), ("topk_tail", 1.0)])
def test_stage2_step_lowers_for_tpu_on_a_mesh(sparse, loss, dense_weight):
    from train.stage2 import Stage2Config, build_step, make_optimizer, state_rules

    c = Stage2Config(model="x", indexer="x", seq_len=4096, batch=4)
    params = abstract_params(CFG, jnp.bfloat16)
    tx = make_optimizer(c, params)
    state = {"params": params, "opt_state": jax.eval_shape(tx.init, params)}
    params_sh = param_shardings(CFG, MESH, state_rules(c))  # FSDP: every matrix split over all 8 devices
    by_shape = {(x.shape, x.dtype): s for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(params_sh))}
    rep = NamedSharding(MESH, P())
    state_sh = {"params": params_sh, "opt_state": jax.tree.map(lambda x: by_shape.get((x.shape, x.dtype), rep),
                                                               state["opt_state"])}
    ix = jax.eval_shape(lambda: init_indexer(CFG, sparse.index_dim, jax.random.key(0)))
    tok_sh = NamedSharding(MESH, P("data"))
    step_j = build_step(CFG, dataclasses.replace(sparse, prefill_mode="indexer"), tx, state_sh, tok_sh, rep,
                        mesh=MESH, loss=loss, dense_weight=dense_weight)  # attention per shard (sequences over "data")
    rows = jax.ShapeDtypeStruct((4, 4096), jnp.int32)
    topk = jax.ShapeDtypeStruct((4, 4096, 10), jnp.int32)
    lse = (jax.ShapeDtypeStruct((4, 4096), jnp.float32),) if loss == "topk_tail" else ()  # the teacher's logsumexp
    exp = jax.export.export(step_j, platforms=["tpu"])(state, ix, rows, jax.ShapeDtypeStruct((4, 4096), jnp.float32),
                                                       topk, jax.ShapeDtypeStruct((4, 4096, 10), jnp.float32), *lse)
    _sharded_for(exp, 8)


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_serving_lowers_for_tpu_with_mosaic_kernels_at_1m(sparse, phase):
    """A 512-token prefill chunk and a decode step over a 1M-token hybrid cache, both ops on Mosaic TPU."""
    s, b, chunk = 1 << 20, 1, 512
    params = abstract_params(CFG, jnp.bfloat16)
    ix = jax.eval_shape(lambda: init_indexer(CFG, sparse.index_dim, jax.random.key(0)))
    backends = ("mosaic_tpu", "mosaic_tpu")
    if phase == "prefill":
        run_sparse = dataclasses.replace(sparse, top_p=1.0)  # retrieval heads dense in prefill (the paper)
        fn = lambda p, c, t, n, i: serving._prefill(p, c, t, n, i, CFG, run_sparse, chunk, backends)
        args = (jax.ShapeDtypeStruct((b, chunk), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.int32))
    else:
        run_sparse = sparse
        fn = lambda p, c, t, i: serving._decode(p, c, t, i, CFG, run_sparse, backends)
        args = (jax.ShapeDtypeStruct((b,), jnp.int32),)
    cache = jax.eval_shape(lambda: init_cache(CFG, b, s, run_sparse, jnp.bfloat16))
    exp = jax.export.export(jax.jit(fn), platforms=["tpu"])(params, cache, *args, ix)
    kernel = "rtpurbo_block_sparse_attention_tpu" if phase == "prefill" else "rtpurbo_sparse_decode_tpu"
    text = exp.mlir_module()
    assert exp.platforms == ("tpu",) and "tpu_custom_call" in text and kernel in text, kernel
    if phase == "decode":  # top-p and plan packing without a sort on TPU (XLA sorts are slow there)
        assert "stablehlo.sort" not in text
