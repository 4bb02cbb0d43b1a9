# Provenance: the probe as run for this directory (an H100 session); it calls `serving._generate`, the
# single-program generate of that time, since split into two programs (`serving.compile_generate`).
import time, json, numpy as np, jax, jax.numpy as jnp
from rtpurbo_jax.model_config import SMOLLM2_135M as cfg
from rtpurbo_jax.params import init_params
from rtpurbo_jax.indexer import init_indexer
from rtpurbo_jax.sparse_config import SparseConfig
from rtpurbo_jax import serving
rng = np.random.default_rng(1)
roles = (rng.random((cfg.num_layers, cfg.num_heads)) < 0.15).astype(int)
sp = SparseConfig(roles=roles.tolist(), window=2048, seqlen_threshold=0)
p = jax.tree.map(lambda x: x.astype(jnp.bfloat16), init_params(cfg, jax.random.key(0), scale=0.02))
ix = init_indexer(cfg, 16, jax.random.key(1))
prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, 1024)), jnp.int32)
out = {}
for name, be in (("kernels", (None, None)), ("reference", ("reference", "reference"))):
    t0 = time.perf_counter()
    lo = serving._generate.lower(p, prompt, jnp.asarray([1024]), ix, jax.random.key(0), cfg=cfg, sparse=sp,
        sampling=serving.SamplingConfig(), max_new_tokens=16, stop_tokens=(), chunk=512, max_len=1040,
        cache_dtype="bfloat16", backend=be, interpret=False)
    t1 = time.perf_counter()
    lo.compile()
    t2 = time.perf_counter()
    out[name] = {"lower_s": t1 - t0, "compile_s": t2 - t1}
    print(name, out[name], flush=True)
