"""`python -m benchmarks.stage2_memory`: does stage 2 of an 8B-shaped model fit? Per-device bytes of what a
training step keeps — fp32 master params, their cast to the model's dtype (the forward's weights, counted whole:
an upper bound where XLA casts layer by layer), gradients, AdamW moments (shapes from `jax.eval_shape` of the real optimiser,
`train.stage2.make_optimizer`; shardings from `train.stage2.state_rules` on an abstract mesh, so no device or
weight is needed) — plus the activations with `--remat` (each layer's input kept, one layer recomputed at a time)
and what the eq. 7 loss keeps (the output embedding's rows at the teacher's top-k ids and their gradient: the
training step never builds the [B, T, V] logits). Writes benchmarks/results/stage2_memory_<model>.json.

    python -m benchmarks.stage2_memory [--model llama3_8b] [--devices 1 8] [--seq-len 8192] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh

from benchmarks.output import add_overwrite, claim, write_json
from rtpurbo_jax.model_config import LLAMA3_8B, ModelConfig
from rtpurbo_jax.params import abstract_params, param_shardings

MODELS = {"llama3_8b": LLAMA3_8B}
GIB = 2 ** 30
HEADROOM = 0.9  # "fits" leaves 10% of the device for XLA's temporaries and fragmentation


def _bytes(tree, shardings=None) -> int:
    """Bytes per device of a ShapeDtypeStruct pytree under `shardings` (None: replicated)."""
    leaves = jax.tree.leaves(tree)
    shs = [None] * len(leaves) if shardings is None else jax.tree.leaves(shardings)
    return int(sum(math.prod(s.shard_shape(x.shape) if s is not None else x.shape) * jnp.dtype(x.dtype).itemsize
                   for x, s in zip(leaves, shs)))


def account(cfg: ModelConfig, devices: int, seq_len: int, batch: int, dtype, fsdp: bool = True,
            trainable: str = "all") -> dict:
    """Per-device GiB of stage 2's training state and activations on a (devices, 1) data x model mesh."""
    from train.stage2 import Stage2Config, make_optimizer, master_weights, state_rules

    c = Stage2Config(model="x", indexer="x", fsdp=fsdp, trainable=trainable, batch=batch, seq_len=seq_len)
    mesh = AbstractMesh((devices, 1), ("data", "model"))
    model = abstract_params(cfg, dtype)
    params = jax.eval_shape(master_weights, model)  # what trains: fp32 masters (the optimiser's params)
    sh = param_shardings(cfg, mesh, state_rules(c))
    opt = jax.eval_shape(make_optimizer(c, params).init, params)
    by_shape = {(x.shape, x.dtype): s for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(sh))}
    # moments follow their params' shardings (as train.stage2 places them); counters and masks are scalars
    opt_bytes = sum(math.prod(by_shape[(x.shape, x.dtype)].shard_shape(x.shape) if (x.shape, x.dtype) in by_shape
                              else x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(opt))
    local_b = max(1, batch // devices)
    act = jnp.dtype(dtype).itemsize
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    layer_inputs = cfg.num_layers * local_b * seq_len * d * act  # remat keeps each layer's input
    one_layer = local_b * seq_len * (6 * d + 3 * f) * act  # one layer's recomputed working set (qkv, attn, mlp)
    k = c.top_k  # the loss gathers the output embedding's rows at the teacher's k ids (and their gradient)
    loss = 2 * local_b * seq_len * k * d * act + 4 * local_b * seq_len * k * 4
    cast = _bytes(model, sh) if jnp.dtype(dtype) != jnp.float32 else 0  # the forward's copy in the model's dtype
    out = {"params": _bytes(params, sh), "params_cast": cast, "grads": _bytes(params, sh),
           "optimizer_state": int(opt_bytes),  # AdamW moments (+ MultiSteps' fp32 gradient sum when accumulating)
           "activations_remat": layer_inputs + one_layer, "loss_topk_rows": loss,
           "vocab_logits_avoided": 3 * local_b * seq_len * v * 4}
    out = {name: b / GIB for name, b in out.items()}
    out["total"] = sum(b for name, b in out.items() if name != "vocab_logits_avoided")
    return {"devices": devices, "fsdp": fsdp, "local_batch": local_b, "gib_per_device": out}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.stage2_memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama3_8b", choices=sorted(MODELS))
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=0, help="global batch (default: one sequence per device)")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--hbm-gib", type=float, default=80.0, help="device memory to compare with (H100: 80)")
    ap.add_argument("--out", default=None)
    add_overwrite(ap)
    a = ap.parse_args(argv)
    out = a.out or os.path.join("benchmarks", "results", f"stage2_memory_{a.model}.json")
    claim(ap, [out], a.overwrite)
    cfg = MODELS[a.model]
    rows = []
    for n in a.devices:
        for fsdp in (False, True):
            r = account(cfg, n, a.seq_len, a.batch or n, jnp.dtype(a.dtype), fsdp)
            r["fits"] = r["gib_per_device"]["total"] < HEADROOM * a.hbm_gib
            rows.append(r)
            g = r["gib_per_device"]
            print(f"[stage2_memory] {a.model} {n} device(s) fsdp={fsdp}: " + ", ".join(f"{k} {v:.1f}" for k, v in g.items())
                  + f" GiB per device -> {'fits' if r['fits'] else 'does not fit'} in {HEADROOM:.0%} of {a.hbm_gib:.0f} GiB")
    write_json(out, {"model": a.model, "device": f"accounting for {a.hbm_gib:.0f} GiB devices (CPU, jax.eval_shape)",
                     "jax": jax.__version__, "date": datetime.date.today().isoformat(), "seq_len": a.seq_len,
                     "dtype": a.dtype, "config": dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else None,
                     "rows": rows}, default=str)
    print(f"[stage2_memory] wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
