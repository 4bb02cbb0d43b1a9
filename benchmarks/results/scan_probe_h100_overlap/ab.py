"""A/B of generate's compile on the device (session 21): `serving.compile_generate` (new: the decode loop lowered
first from init_cache's shapes and compiled in a thread while the prefill lowers) against the previous order
(both lowered, then both compiled in two threads), each in a fresh process. SmolLM2 shape, random bf16 weights,
the H200 run's roles, 2048-token prompt + 16 new tokens, the device's kernels.
usage: python benchmarks/results/scan_probe_h100_overlap/ab.py OUT.json  (runs the four children itself)"""
import json, subprocess, sys, time

if len(sys.argv) == 2:
    rows = []
    for rep in range(2):
        for order in ("previous", "overlapped"):
            for scan in ("False", "padded"):
                out = subprocess.run([sys.executable, __file__, order, scan], capture_output=True, text=True)
                line = [l for l in out.stdout.splitlines() if l.startswith("{")]
                rows.append(json.loads(line[-1]) if line else {"order": order, "scan": scan, "error": out.stderr[-2000:]})
                print(rows[-1], flush=True)
    import jax
    json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"),
               "rows": rows}, open(sys.argv[1], "w"), indent=1)
    sys.exit(0)

import dataclasses
from concurrent.futures import ThreadPoolExecutor
import jax, jax.numpy as jnp
from rtpurbo_jax import serving
from rtpurbo_jax.indexer import init_indexer
from rtpurbo_jax.model_config import SMOLLM2_135M as cfg
from rtpurbo_jax.params import init_params
from rtpurbo_jax.sparse_config import SparseConfig

order, scan = sys.argv[1], (False if sys.argv[2] == "False" else sys.argv[2])
meta = json.load(open("benchmarks/results/scan_probe_h200/rtpurbo.json"))
sp = dataclasses.replace(SparseConfig.from_dict(meta["sparse_config"]), seqlen_threshold=0)
p = jax.tree.map(lambda x: x.astype(jnp.bfloat16), init_params(cfg, jax.random.key(0), scale=0.02))
ix = init_indexer(cfg, sp.index_dim, jax.random.key(1))
L = 2048
prompt = jax.random.randint(jax.random.key(2), (1, L), 0, cfg.vocab_size)
args = (p, prompt, jnp.asarray([L]), ix, jax.random.key(0))
static = dict(cfg=cfg, sparse=sp, sampling=serving.SamplingConfig(), stop_tokens=(), chunk=512, max_len=L + 16,
              cache_dtype="bfloat16", backend=(None, None), interpret=False, scan_layers=scan)
jax.block_until_ready(args)
t0 = time.perf_counter()
if order == "overlapped":
    exe = serving.compile_generate(*args, max_new_tokens=16, **static)
    lower, comp = exe.lower_s, exe.compile_s
else:
    lo_p = serving._generate_prefill.lower(*args, **static)
    first, done, key2, cache = lo_p.out_info
    dec = {k: static[k] for k in ("cfg", "sparse", "sampling", "stop_tokens", "backend", "interpret")}
    lo_d = serving._generate_decode.lower(p, cache, first, done, key2, ix, max_new_tokens=16, **dec)
    t1 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda lo: lo.compile(), (lo_p, lo_d)))
    lower, comp = t1 - t0, time.perf_counter() - t1
print(json.dumps({"order": order, "scan": scan, "lower_s": lower, "compile_s": comp,
                  "total_s": time.perf_counter() - t0}))
