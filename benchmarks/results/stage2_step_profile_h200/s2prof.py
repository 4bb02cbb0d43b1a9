"""Device probe (not committed as a tool): where the time of one stage-2 step goes on SmolLM2 at 8K.
Times, each jitted alone on the same tokens: the teacher's dense forward, the student's sparse forward (at the
teacher's top-10 ids), its value_and_grad (remat on / off), the same grad in full attention; then a profiler
trace of the sparse grad summed per kernel. argv: CONVERTED INDEXER OUT_JSON [T]"""
import dataclasses, datetime, json, sys, tempfile, time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.e2e_profile import device_kernels
from rtpurbo_jax.checkpoint import load_converted, load_indexer
from rtpurbo_jax.lm import apply
from rtpurbo_jax.model import logits_at
from rtpurbo_jax.sparse_config import SparseConfig
from train.stage2 import student_logits
from train.teacher import teacher_topk, topk_kl_at

conv, ixp, out = sys.argv[1:4]
T = int(sys.argv[4]) if len(sys.argv) > 4 else 8192
if conv == "random":  # SmolLM2's shape, random bf16 weights, 41 of 270 heads retrieval, random indexer
    from rtpurbo_jax.model_config import SMOLLM2_135M as cfg
    from rtpurbo_jax.params import init_params
    from rtpurbo_jax.indexer import init_indexer
    params = init_params(cfg, jax.random.key(0), jnp.bfloat16)
    roles = np.zeros((cfg.num_layers, cfg.num_heads), int)
    roles.reshape(-1)[np.random.default_rng(0).choice(roles.size, 41, replace=False)] = 1
    sparse = SparseConfig(roles=roles.tolist(), sinks=4, window=2048, kv_block=64, q_block=128, index_dim=16,
                          top_p=0.9, seqlen_threshold=0, prefill_mode="indexer")
    ix = init_indexer(cfg, 16, jax.random.key(1))
else:
    ck = load_converted(conv)
    cfg = ck.model_config
    params = ck.params
    shipped = SparseConfig.from_dict(ck.meta["sparse_config"])
    sparse = dataclasses.replace(shipped, prefill_mode="indexer", top_p=0.9, seqlen_threshold=0)
    ix = load_indexer(ixp, cfg, shipped.index_dim)
toks = jnp.asarray(np.random.default_rng(0).integers(100, cfg.vocab_size - 100, (1, T)), jnp.int32)
t_logits_full = jax.jit(lambda p, t: apply(p, t, cfg))(params, toks)
ids, vals = teacher_topk(t_logits_full, 10)
del t_logits_full
w = jnp.ones(toks.shape, jnp.float32)


def timeit(name, f, *a, n=3):
  print("timing", name, flush=True)
  try:
    t0 = time.perf_counter(); jax.block_until_ready(f(*a)); c = time.perf_counter() - t0
    ts = []
    for _ in range(n):
        t0 = time.perf_counter(); jax.block_until_ready(f(*a)); ts.append(time.perf_counter() - t0)
    r = {"name": name, "first_s": c, "ms": 1e3 * float(np.median(ts))}
    print(json.dumps(r), flush=True)
    return r
  except Exception as e:  # noqa: BLE001
    r = {"name": name, "error": str(e)[:300]}; print(r, flush=True); return r


rows = []
rows.append(timeit("teacher_dense_forward_logits", jax.jit(lambda p, t: apply(p, t, cfg)), params, toks))
rows.append(timeit("student_sparse_forward_at_ids", jax.jit(
    lambda p, t: student_logits(p, t, cfg, sparse, ix, False, at=ids)), params, toks))
dense_at = lambda p, t: logits_at(p, apply(p, t, cfg, return_hidden=True), cfg, ids)
rows.append(timeit("dense_forward_at_ids", jax.jit(dense_at), params, toks))
for remat in (True, False):
    g = jax.jit(jax.value_and_grad(lambda p, t: topk_kl_at(student_logits(p, t, cfg, sparse, ix, remat, at=ids), vals, w)))
    try:
        rows.append(timeit(f"student_sparse_grad_remat_{remat}", g, params, toks))
    except Exception as e:  # noqa: BLE001
        rows.append({"name": f"student_sparse_grad_remat_{remat}", "error": str(e)[:300]}); print(rows[-1])
gd = jax.jit(jax.value_and_grad(lambda p, t: topk_kl_at(dense_at(p, t), vals, w)))
rows.append(timeit("dense_grad", gd, params, toks))
g = jax.jit(jax.value_and_grad(lambda p, t: topk_kl_at(student_logits(p, t, cfg, sparse, ix, True, at=ids), vals, w)))
d = tempfile.mkdtemp()
try:
    with jax.profiler.trace(d, create_perfetto_trace=True):
        for _ in range(2):
            jax.block_until_ready(g(params, toks))
    k = device_kernels(d, 2)
except Exception as e:  # noqa: BLE001
    print("profile failed", str(e)[:300]); k = {"kernels": {}}
top = dict(list(k["kernels"].items())[:30])
print(json.dumps(top, indent=0)[:4000])
res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "date": str(datetime.date.today()),
       "model": conv, "T": T,
       "sparse": sparse.to_dict() if hasattr(sparse, "to_dict") else str(sparse), "rows": rows,
       "sparse_grad_kernels_us_per_step_top30": top,
       "sparse_grad_device_us_total": sum(k["kernels"].values())}
json.dump(res, open(out, "w"), indent=1)
