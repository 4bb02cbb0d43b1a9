import json, sys, jax, jax.numpy as jnp, numpy as np
from benchmarks.kernels import bench
from benchmarks.prefill_plans import layer_plan
from pallas_kernels.sparse_attention.xla import block_sparse_attention_xla
out = []
for t in (8192, 32768):
    n, k, h = 14, 2, 64
    plan, visited = layer_plan("mix", t, n, qb=128, kb=64, density=0.15, retrieval=2, window=8192, sinks=4)
    rng = np.random.default_rng(1)
    q, kk, v = (jnp.asarray(rng.normal(size=s), jnp.bfloat16) for s in ((1, t, n, h), (1, t, k, h), (1, t, k, h)))
    for rpg in (1024, 2048, 4096, 8192):
        for u in (2, 4, 8, 16):
            loss = lambda q, k, v: block_sparse_attention_xla(q, k, v, plan, rows_per_group=rpg, blocks_per_step=u)[0].astype(jnp.float32).sum()
            try:
                fb = 1e3 * bench(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), q, kk, v, reps=2, rounds=2)
                fw = 1e3 * bench(jax.jit(lambda q, k, v: block_sparse_attention_xla(q, k, v, plan, rows_per_group=rpg, blocks_per_step=u)[0]), q, kk, v, reps=2, rounds=2)
                r = {"t": t, "rows_per_group": rpg, "blocks_per_step": u, "fwd_ms": fw, "fwd_bwd_ms": fb}
            except Exception as e:
                r = {"t": t, "rows_per_group": rpg, "blocks_per_step": u, "error": str(e)[:200]}
            print(json.dumps(r), flush=True); out.append(r)
json.dump(out, open(sys.argv[1], "w"), indent=1)
