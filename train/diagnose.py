"""`python -m train.diagnose`: where does the indexer lose the needle? Per layer and retrieval head, at the
answer position of retrieval prompts (`rtpurbo_jax.evals.tasks`, held-out text), compare the indexer's top-p block
set with the oracle's (top-p over the head's exact attention, same p, same forced sink / recent blocks).

    python -m train.diagnose --converted DIR --indexer [NAME=]DIR [...] [--length 8000] [--prompts 8]

Per head and indexer: the teacher's heaviest non-forced block (the needle at an answer position) — its teacher
mass, whether the indexer's set holds it (needle recall), its mass and rank under the indexer; the indexer's
and the oracle's mass on the forced blocks and their set sizes. Writes JSON (+ a summary line per indexer).
"""

from __future__ import annotations

import argparse
import datetime
import json

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_plan import cdiv
from pallas_kernels.indexer_topp.reference import forced_blocks, topp_select
from rtpurbo_jax.model import forward
from train.objective import _chunk_logits, add_local_prior, gather_heads


def head_report(hx: dict, train: dict, row: int, *, top_p: float, kv_block: int, sinks: int, keep_recent: int) -> dict:
    """Arrays [R] for query position `row` of one sequence (hx arrays [R, 1, T, H]; train {w_q, w_k: [R, H, I]})."""
    r, _, t, h = hx["q"].shape
    one = {k: (v[:, :, row:row + 1] if k.startswith("q") else v[:, :, : row + 1]) for k, v in hx.items()}
    tl, sl = _chunk_logits(0, 1, one, train, h ** -0.5)  # [R, 1, 1, row + 1]
    sl = add_local_prior(sl, one["q_pre"], train, jnp.asarray([row]), kv_block, sinks, keep_recent)
    s = row + 1
    sb = cdiv(s, kv_block)
    blk = lambda x: jnp.pad(x, [(0, 0)] * 3 + [(0, sb * kv_block - s)]).reshape(r, sb, kv_block).sum(-1)
    bt, bs = blk(jax.nn.softmax(tl, -1)), blk(jax.nn.softmax(sl, -1))  # [R, Sb]
    vis = jnp.ones_like(bt, bool)
    forced = forced_blocks(jnp.int32(row), jnp.int32(row), sb, kv_block, sinks, keep_recent)[None] & vis
    sel, ora = topp_select(bs, vis, forced, top_p), topp_select(bt, vis, forced, top_p)
    top = jnp.argmax(jnp.where(forced, -1.0, bt), -1)
    take = lambda x: jnp.take_along_axis(x, top[:, None], -1)[:, 0]
    rank = (bs > take(bs)[:, None]).sum(-1)  # 0 = the indexer's heaviest block
    return {"needle_teacher_mass": take(bt), "needle_in_indexer_set": take(sel), "needle_in_oracle_set": take(ora),
            "needle_indexer_mass": take(bs), "needle_indexer_rank": rank,
            "forced_mass_teacher": jnp.where(forced, bt, 0).sum(-1), "forced_mass_indexer": jnp.where(forced, bs, 0).sum(-1),
            "indexer_blocks": sel.sum(-1) / sb, "oracle_blocks": ora.sum(-1) / sb}


def diagnose(params, cfg, tok, sparse, indexers: dict, *, length: int, prompts: int, tasks, seed: int = 0) -> dict:
    from rtpurbo_jax.evals.tasks import Builder, make_prompt

    heads = np.argwhere(sparse.roles_array).astype(np.int32)
    b = Builder(tok)
    fwd = jax.jit(lambda p, x: gather_heads(forward(p, x, cfg, collect=("q", "k", "q_pre", "k_pre"),
                                                    return_hidden=True)[1], heads, cfg.group_size))
    per = {n: [] for n in indexers}
    for task in tasks:
        for i in range(prompts):
            pr = make_prompt(tok, task, length, i, seed, b)
            hx = jax.tree.map(lambda a: a.astype(jnp.float32), fwd(params, jnp.asarray(pr.tokens[None])))
            for n, ix in indexers.items():
                train = {k: jnp.asarray(v)[heads[:, 0], heads[:, 1]] for k, v in ix.items()}
                rep = head_report(hx, train, length - 1, top_p=sparse.top_p, kv_block=sparse.kv_block,
                                  sinks=sparse.sinks, keep_recent=sparse.keep_recent)
                per[n].append({k: np.asarray(v, np.float64) for k, v in rep.items()})
    out = {"heads": heads.tolist(), "length": length, "prompts": prompts, "tasks": list(tasks), "indexers": {}}
    for n, reps in per.items():
        stack = {k: np.stack([r[k] for r in reps]) for k in reps[0]}  # [P, R]
        attends = stack["needle_teacher_mass"] >= 0.1  # heads that really retrieve at this position
        summ = {k: float(v.mean()) for k, v in stack.items()}
        summ.update({f"{k}_where_attending": float(v[attends].mean()) if attends.any() else None
                     for k, v in stack.items()})
        summ["attending_fraction"] = float(attends.mean())
        out["indexers"][n] = {"summary": summ, "per_head": {k: v.mean(0).tolist() for k, v in stack.items()}}
    return out


def main(argv=None) -> int:
    from rtpurbo_jax.checkpoint import load_converted, load_indexer
    from rtpurbo_jax.sparse_config import SparseConfig

    p = argparse.ArgumentParser(prog="python -m train.diagnose", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--converted", required=True)
    p.add_argument("--indexer", action="append", required=True, help="DIR or NAME=DIR")
    p.add_argument("--length", type=int, default=8000)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--tasks", nargs="+", default=["niah_single_prose", "niah_multikey"])
    p.add_argument("--out", required=True, help="JSON path")
    args = p.parse_args(argv)
    ck = load_converted(args.converted)
    sparse = SparseConfig.from_dict(ck.meta["sparse_config"])
    ixs = {}
    for spec in args.indexer:
        name, _, path = spec.rpartition("=")
        ixs[name or path] = load_indexer(path, ck.model_config, sparse.index_dim)
    res = diagnose(ck.params, ck.model_config, ck.tokenizer(), sparse, ixs, length=args.length,
                   prompts=args.prompts, tasks=args.tasks)
    res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
           "date": datetime.date.today().isoformat(), "model": args.converted, **res}
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    for n, r in res["indexers"].items():
        s = r["summary"]
        print(f"[diagnose] {n}: needle recall indexer {s['needle_in_indexer_set']:.3f} vs oracle "
              f"{s['needle_in_oracle_set']:.3f} (heads attending >=0.1: {s['needle_in_indexer_set_where_attending']}); "
              f"needle rank {s['needle_indexer_rank']:.1f}, indexer mass {s['needle_indexer_mass']:.3f} vs teacher "
              f"{s['needle_teacher_mass']:.3f}; forced mass indexer {s['forced_mass_indexer']:.3f} vs teacher "
              f"{s['forced_mass_teacher']:.3f}; blocks {s['indexer_blocks']:.3f} vs oracle {s['oracle_blocks']:.3f}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
