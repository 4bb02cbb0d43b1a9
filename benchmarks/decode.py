"""Sparse decode microbenchmarks on the GPU against cuDNN dense decode, in one run.

    python -m benchmarks.decode [--lengths 32768 131072] [--batches 1 8] [--out benchmarks/results/decode_h100]

Shapes: 32 query / 8 KV heads, head_dim 128, bf16 (Llama-3.1-8B attention), one query token per sequence.
Every variant is checked against the jnp reference before it is timed (calls enqueued back to back, median of 3).
Bytes = K + V of the blocks a kernel must read (each group's union once); GB/s over those bytes, and as a
fraction of a device copy's bandwidth measured in the same run. Also timed: the exact XLA indexer scoring +
top-p selection + plan packing for one layer's retrieval heads (its share of the sparse attention time).
"""

from __future__ import annotations

import argparse
import datetime

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.kernels import bench
from benchmarks.output import add_overwrite, claim, write_json
from pallas_kernels.block_plan import FULL_WINDOW, cdiv
from pallas_kernels.indexer_topp.api import decode_plan_select, decode_selection
from pallas_kernels.indexer_topp.reference import forced_blocks, topp_select, topp_selection_at
from pallas_kernels.sparse_decode.api import sparse_decode_attention
from pallas_kernels.sparse_decode.plan import decode_plan, decode_token_mask

N, K, H, KB = 32, 8, 128, 64
G = N // K


def copy_bandwidth(n: int = 1 << 30) -> float:
    """Bytes/s of a device copy of n bf16 values (read + write)."""
    x = jnp.ones((n,), jnp.bfloat16)
    f = jax.jit(lambda a: a * 2)
    return 2 * x.nbytes / bench(f, x, reps=5)


def selection(kind: str, b: int, s: int, density: float, rng) -> np.ndarray:
    """bool [B, N, Sb]: 'group' = one random set per GQA group (kv granularity), 'head' = per query head,
    'dense' = everything. The last block is always kept (the query's own)."""
    sb = cdiv(s, KB)
    if kind == "dense":
        return np.ones((b, N, sb), bool)
    shape = (b, K, 1, sb) if kind == "group" else (b, K, G, sb)
    sel = np.broadcast_to(rng.random(shape) < density, (b, K, G, sb)).reshape(b, N, sb).copy()
    sel[..., -1] = True
    return sel


def read_bytes(plan) -> int:
    return int(np.asarray(plan.counts).sum()) * KB * H * 2 * 2


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--densities", type=float, nargs="+", default=[0.10, 0.05, 0.02])
    p.add_argument("--out", default="benchmarks/results/decode_h100")
    p.add_argument("--dry-run", action="store_true", help="CPU check of the script: XLA baseline, interpret mode")
    p.add_argument("--layer-only", type=int, nargs="*", default=None, metavar="INDEX_DIM",
                   help="only the whole-layer rows (cuDNN dense, selection + attention), at these index dims")
    p.add_argument("--index-dtypes", nargs="+", default=["bfloat16"], choices=["bfloat16", "float8_e4m3fn"],
                   help="with --layer-only: the index keys' dtype(s) (SparseConfig.index_dtype)")
    p.add_argument("--shared-index-keys", action="store_true",
                   help="with --layer-only: 5 retrieval heads in 2 KV groups (4 + 1), their index keys stored per "
                        "head and once per group (SparseConfig.shared_index_keys: 2 key slots)")
    p.add_argument("--tokens", type=int, default=0,
                   help="only time C query tokens per sequence in one call vs C one-token calls")
    add_overwrite(p)
    args = p.parse_args(argv)
    claim(p, [args.out + ".json"], args.overwrite)
    impl, interp = ("xla", True) if args.dry_run else ("cudnn", False)
    rng = np.random.default_rng(0)
    bw = copy_bandwidth(1 << 20 if args.dry_run else 1 << 30)
    res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
           "date": datetime.date.today().isoformat(), "shape": dict(q_heads=N, kv_heads=K, head_dim=H, kv_block=KB),
           "copy_GBps": bw / 1e9, "rows": []}
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    fn = jax.jit(lambda q, k, v, plan: sparse_decode_attention(q, k, v, plan, backend="triton", interpret=interp)[0])
    cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q[:, None], k, v, implementation=impl)[:, 0])
    for s in args.lengths:
        for b in args.batches:
            if args.tokens:
                res["rows"] += multi_token_rows(s, b, args.tokens, args.densities[0], rng, impl, interp)
                continue
            kq = jax.random.split(jax.random.key(s + b), 3)
            if args.layer_only is not None:
                q = jax.random.normal(kq[0], (b, N, H), jnp.bfloat16)
                k = jax.random.normal(kq[1], (b, s, K, H), jnp.bfloat16)
                v = jax.random.normal(kq[2], (b, s, K, H), jnp.bfloat16)
                t_cudnn = bench(cudnn, q, k, v)
                res["rows"].append({"S": s, "B": b, "variant": f"{impl} dense", "us": t_cudnn * 1e6})
                for dim in args.layer_only or [16]:
                    for kdt in args.index_dtypes:
                        for shared in (False, True) if args.shared_index_keys else (None,):
                            layer_rows(res, q, k, v, s, b, t_cudnn, interp, dim, kdt, shared)
                continue
            q = jax.random.normal(kq[0], (b, N, H), jnp.bfloat16)
            k = jax.random.normal(kq[1], (b, s, K, H), jnp.bfloat16)
            v = jax.random.normal(kq[2], (b, s, K, H), jnp.bfloat16)
            dense_bytes = b * s * K * H * 2 * 2
            t_cudnn = bench(cudnn, q, k, v)
            row0 = {"S": s, "B": b, "variant": f"{impl} dense", "us": t_cudnn * 1e6, "GBps": dense_bytes / t_cudnn / 1e9}
            res["rows"].append(row0)
            print(row0, flush=True)
            variants = [("dense", 1.0)] + [(kind, d) for d in args.densities for kind in ("group", "head")]
            for kind, dens in variants:
                sel = selection(kind, b, s, dens, rng)
                plan = decode_plan(jnp.asarray(sel), K, sinks=0, window=FULL_WINDOW, kv_len=s, kv_block=KB)
                ref, _ = sparse_decode_attention(q, k, v, plan, backend="reference")
                out = fn(q, k, v, plan)
                err = float(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32)).max())
                t = bench(fn, q, k, v, plan)
                nbytes = read_bytes(plan)
                row = {"S": s, "B": b, "variant": f"ours {kind}", "density": dens,
                       "union_frac": float(np.asarray(plan.counts).mean() / cdiv(s, KB)), "us": t * 1e6,
                       "GBps": nbytes / t / 1e9, "frac_copy_bw": nbytes / t / bw, "speedup_vs_cudnn": t_cudnn / t,
                       "max_abs_err_vs_ref": err}
                res["rows"].append(row)
                print(row, flush=True)
            # indexer scoring + exact top-p selection + packing for one retrieval group (G heads), 16-dim keys
            qi = jax.random.normal(kq[0], (b, 1, G, 16), jnp.float32)
            ki = jax.random.normal(kq[1], (b, s, G, 16), jnp.float32)

            def select(qi, ki):
                sel = topp_selection_at(qi, ki, jnp.full((b, 1), s - 1), jnp.full((b,), s), top_p=0.9, tile=1,
                                        kv_block=KB, sinks=4, keep_recent=64)[:, :, 0]
                return decode_plan(sel, 1, sinks=0, window=FULL_WINDOW, kv_len=s, kv_block=KB)

            def select_fused(qi, ki):
                sel = decode_selection(qi[:, 0], ki, jnp.full((b,), s), top_p=0.9, kv_block=KB, sinks=4,
                                       keep_recent=64, backend="triton", interpret=interp)
                return decode_plan(sel, 1, sinks=0, window=FULL_WINDOW, kv_len=s, kv_block=KB)

            def select_only(lse):  # the XLA part alone: block masses -> exact top-p -> plan
                mass = jax.nn.softmax(lse, axis=-1)
                forced = forced_blocks(jnp.full((b,), s - 1), jnp.full((b,), s - 1), lse.shape[-1], KB, 4, 64)
                sel = topp_select(mass, jnp.isfinite(lse), forced[:, None], 0.9)
                return decode_plan(sel, 1, sinks=0, window=FULL_WINDOW, kv_len=s, kv_block=KB)

            t_only = bench(jax.jit(select_only), jax.random.normal(kq[2], (b, G, cdiv(s, KB)), jnp.float32) * 3)
            res["rows"].append({"S": s, "B": b, "variant": "XLA top-p + plan only (given block masses)",
                                "us": t_only * 1e6})
            print(res["rows"][-1], flush=True)
            def select_kernels(qi, ki):  # two launches: scoring + sort-free top-p / packing
                return decode_plan_select(qi[:, 0], ki, jnp.full((b,), s), retrieval=tuple(range(G)),
                                          num_kv_heads=1, head_sinks=[0] * G, head_window=[0] * G, top_p=0.9,
                                          kv_block=KB, sinks=4, keep_recent=64, backend="triton", interpret=interp)

            ref_mask = decode_token_mask(jax.jit(select)(qi, ki), s)
            for name, f in (("XLA indexer + top-p + plan (one group)", select),
                            ("fused Pallas scoring + XLA top-p + plan (one group)", select_fused),
                            ("Pallas scoring + Pallas sort-free top-p/plan (one group)", select_kernels)):
                same = float((decode_token_mask(jax.jit(f)(qi, ki), s) == ref_mask).mean())
                t_sel = bench(jax.jit(f), qi, ki)
                row = {"S": s, "B": b, "variant": name, "us": t_sel * 1e6, "plan_agreement": same}
                res["rows"].append(row)
                print(row, flush=True)
            res["rows"].append(histogram_overselection(qi, ki, s, b))
            print(res["rows"][-1], flush=True)
            layer_rows(res, q, k, v, s, b, t_cudnn, interp)
    write_json(args.out + ".json", res)
    plot(res, args.out + ".png")
    return res


def histogram_overselection(qi, ki, s, b, bins: int = 256, span: float = 32.0) -> dict:
    """The histogram-only selection (RTPurbo's one-pass design: 256 bins of log2 block mass over [-span, 0],
    keep every bin down to the one where the cumulative mass reaches p, the boundary bin whole) against the
    exact top-p, on the same masses: mean extra blocks per head."""
    sel = jax.jit(lambda qi, ki: decode_selection(qi[:, 0], ki, jnp.full((b,), s), top_p=0.9, kv_block=KB,
                                                  sinks=4, keep_recent=64, backend="reference"))(qi, ki)
    sc = jnp.einsum("bri,bsri->brs", qi[:, 0], ki)
    lse = jax.nn.logsumexp(sc.reshape(b, G, -1, KB), axis=-1)
    mass = jax.nn.softmax(lse, axis=-1)
    forced = forced_blocks(jnp.full((b,), s - 1), jnp.full((b,), s - 1), mass.shape[-1], KB, 4, 64)[:, None]
    lvl = jnp.clip(((jnp.log2(jnp.maximum(mass, 1e-30)) + span) / span * bins).astype(jnp.int32), 0, bins - 1)
    hist = jnp.zeros((b, G, bins)).at[jnp.arange(b)[:, None, None], jnp.arange(G)[None, :, None], lvl].add(
        jnp.where(forced, 0.0, mass))
    base = jnp.where(forced, mass, 0.0).sum(-1, keepdims=True)
    above = base + jnp.cumsum(hist[..., ::-1], axis=-1)[..., ::-1]  # mass in bins >= each bin
    thr = jnp.max(jnp.where(above >= 0.9, jnp.arange(bins), -1), axis=-1, keepdims=True)
    hsel = forced | (lvl >= thr)
    exact, hist_n = float(sel.sum(-1).mean()), float(hsel.sum(-1).mean())
    return {"S": s, "B": b, "variant": "histogram-only top-p (256 log2 bins) vs exact", "exact_blocks": exact,
            "histogram_blocks": hist_n, "overselection": hist_n / exact - 1.0}


def layer_rows(res, q, k, v, s, b, t_cudnn, interp, index_dim: int = 16, index_dtype: str = "bfloat16",
               shared: bool | None = None):
    """One whole layer's decode step: 5 of 32 heads retrieval (indexer top-p), the rest sinks 4 + window 8192 in
    the full cache; plan (both kernels) + sparse decode attention, against cuDNN dense decode. index_dtype: the
    index keys' dtype (random keys drawn in bf16, then cast). shared: None — the 5 heads on 5 KV heads; False /
    True — on 2 KV heads (4 + 1), their keys stored per head / once per group (2 slots: `key_slot`)."""
    retrieval = (0, 7, 13, 22, 29) if shared is None else (0, 1, 2, 3, 13)
    key_slot = (0, 0, 0, 0, 1) if shared else None
    kq = jax.random.split(jax.random.key(s + 7 * b), 2)
    peak = 2.5 * (16 / index_dim) ** 0.5  # the same score spread (a real top-p choice) at any index_dim
    qi = peak * jax.random.normal(kq[0], (b, len(retrieval), index_dim), jnp.float32)
    ki = jax.random.normal(kq[1], (b, s, 2 if shared else len(retrieval), index_dim), jnp.bfloat16).astype(index_dtype)
    kw = dict(retrieval=retrieval, num_kv_heads=K, head_sinks=[4] * N, head_window=[8192] * N, top_p=0.9,
              kv_block=KB, sinks=4, keep_recent=64, interpret=interp, key_slot=key_slot)
    tag = {None: {}, False: {"index_keys": "per head, 5 heads on 2 KV heads"},
           True: {"index_keys": "per KV group (2 slots), 5 heads on 2 KV heads"}}[shared]
    for sel_backend in ("reference", "triton"):
        def step(q, k, v, qi, ki, sel_backend=sel_backend):
            plan = decode_plan_select(qi, ki, jnp.full((b,), s), backend=sel_backend, **kw)
            return sparse_decode_attention(q, k, v, plan, backend="triton", interpret=interp)[0]

        f = jax.jit(step)
        out = f(q, k, v, qi, ki)
        plan = decode_plan_select(qi, ki, jnp.full((b,), s), backend="reference", **kw)
        ref, _ = sparse_decode_attention(q, k, v, plan, backend="reference")
        err = float(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32)).max())
        t = bench(f, q, k, v, qi, ki)
        row = {"S": s, "B": b, "index_dim": index_dim, "index_dtype": index_dtype, **tag,
               "variant": f"layer: {sel_backend} selection + sparse decode (5 retrieval heads)",
               "us": t * 1e6, "speedup_vs_cudnn": t_cudnn / t, "union_frac": float(np.asarray(plan.counts).mean()
                                                                                   / cdiv(s, KB)),
               "max_abs_err_vs_ref": err}
        res["rows"].append(row)
        print(row, flush=True)
    att = jax.jit(lambda q, k, v, plan: sparse_decode_attention(q, k, v, plan, backend="triton", interpret=interp)[0])
    t_att = bench(att, q, k, v, plan)
    sel = jax.jit(lambda qi, ki: decode_plan_select(qi, ki, jnp.full((b,), s), backend="triton", **kw))
    t_sel = bench(sel, qi, ki)
    row = {"S": s, "B": b, "index_dim": index_dim, "index_dtype": index_dtype, **tag,
           "variant": "layer: sparse decode attention only (same plan)",
           "us": t_att * 1e6,
           "speedup_vs_cudnn": t_cudnn / t_att, "selection_us": t_sel * 1e6, "selection_share": t_sel / t_att}
    res["rows"].append(row)
    print(row, flush=True)


def multi_token_rows(s, b, c, density, rng, impl, interp) -> list[dict]:
    """C tokens per sequence (speculative / chunked decode), each head x token with its own blocks at `density`
    (per group, shared by the group's heads): one folded call vs C one-token calls vs dense masked attention."""
    from pallas_kernels.sparse_decode.api import sparse_decode_tokens
    from pallas_kernels.sparse_decode.plan import fold_tokens, token_shifts

    kq = jax.random.split(jax.random.key(s + b + c), 3)
    q = jax.random.normal(kq[0], (b, c, N, H), jnp.bfloat16)
    k = jax.random.normal(kq[1], (b, s, K, H), jnp.bfloat16)
    v = jax.random.normal(kq[2], (b, s, K, H), jnp.bfloat16)
    sel = np.stack([selection("group", b, s, density, rng) for _ in range(c)], axis=1)  # [B, C, N, Sb]
    plan = decode_plan(fold_tokens(jnp.asarray(sel), K), K, sinks=0, window=FULL_WINDOW, kv_len=s, kv_block=KB,
                       q_shift=token_shifts(N, c))
    plans1 = [decode_plan(jnp.asarray(sel[:, i]), K, sinks=0, window=FULL_WINDOW, kv_len=s - (c - 1 - i),
                          kv_block=KB) for i in range(c)]
    many = jax.jit(lambda q, k, v, plan: sparse_decode_tokens(q, k, v, plan, backend="triton", interpret=interp)[0])
    ones = jax.jit(lambda q, k, v, plans: jnp.stack([sparse_decode_attention(q[:, i], k, v, p, backend="triton",
                                                                             interpret=interp)[0]
                                                     for i, p in enumerate(plans)], axis=1))
    err = float(jnp.abs(many(q, k, v, plan).astype(jnp.float32) - ones(q, k, v, plans1).astype(jnp.float32)).max())
    mask = jnp.tril(jnp.ones((c, s), bool), s - c)[None, None]  # token i sees keys <= s - c + i
    dense = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask))  # jax picks the backend
    t_many, t_ones, t_dense = bench(many, q, k, v, plan), bench(ones, q, k, v, plans1), bench(dense, q, k, v)
    rows = [{"S": s, "B": b, "variant": f"{c} tokens, one folded call, {density:.0%} per group", "us": t_many * 1e6,
             "speedup_vs_dense": t_dense / t_many, "max_abs_diff_vs_separate": err,
             "union_frac": float(np.asarray(plan.counts).mean() / cdiv(s, KB))},
            {"S": s, "B": b, "variant": f"{c} tokens, {c} one-token calls", "us": t_ones * 1e6},
            {"S": s, "B": b, "variant": f"{c} tokens, dense masked attention (jax.nn, auto backend)", "us": t_dense * 1e6}]
    for r in rows:
        print(r, flush=True)
    return rows


def plot(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["S"], r["B"]) for r in res["rows"]})
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 4), squeeze=False)
    for ax, (s, b) in zip(axes[0], keys):
        rows = [r for r in res["rows"] if r["S"] == s and r["B"] == b and "us" in r]
        labels = [r["variant"].replace("ours ", "") + (f" {r['density']:.0%}" if "density" in r and r["density"] < 1 else "")
                  for r in rows]
        ax.barh(range(len(rows)), [r["us"] for r in rows])
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        ax.set_xlabel("µs per decode step (one layer)")
        ax.set_title(f"S={s // 1024}K, B={b}")
    fig.suptitle(f"sparse decode vs cuDNN dense, {res['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
