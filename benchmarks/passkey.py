"""Pass-key retrieval accuracy of SmolLM2 under head-role choices (calibration evidence, issue 4).

    python -m benchmarks.passkey [--lengths 2048 4096 8192] [--prompts 20] [--calib-len 8192] [--calib-docs 8]

Configs: full attention; calibrated retrieval heads dense + the rest local (4 sinks + window 256 / 512);
the same number of random heads dense + the rest local; `kv` granularity. No indexer (retrieval heads are
dense). Haystacks come from the corpus's `eval` split (held out from calibration); each prompt has exactly
`length` tokens, a random 5-digit key at a depth spread over 5%..95%, and is scored by greedy decoding
(the key's digits must appear in the first 8 generated tokens). Writes JSON + PNG.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.output import add_overwrite, claim, write_json
from convert.calibrate import CalibConfig, calibrate_model, head_count, select_roles
from convert.corpus import text_tokens
from rtpurbo_jax.kv_memory import kv_cache_bytes
from rtpurbo_jax.model import forward, logits_from_hidden
from rtpurbo_jax.model_config import ModelConfig
from rtpurbo_jax.lm import rtpurbo_attn_fn
from rtpurbo_jax.sparse_config import SparseConfig

GEN_TOKENS = 8
INTRO = "There is a pass key hidden inside a lot of irrelevant text. Find it and remember it.\n\n"
QUESTION = "\n\nWhat is the pass key? Answer with the number only."


def build_prompt(tok, length: int, key: str, depth: float, seed: int) -> np.ndarray:
    """int32 [length]: chat-formatted prompt, haystack from the eval split, the key sentence at `depth`."""
    head, tail = tok.apply_chat_template([{"role": "user", "content": "XXXX"}], add_generation_prompt=True,
                                         tokenize=False).split("XXXX")
    enc = lambda s: tok.encode(s, add_special_tokens=False)
    pre, needle = enc(head + INTRO), enc(f" The pass key is {key}. Remember it. {key} is the pass key. ")
    post = enc(QUESTION + tail + "The pass key is")
    n_hay = length - len(pre) - len(needle) - len(post)
    if n_hay < 16:
        raise ValueError(f"length {length} leaves no room for a haystack")
    hay = text_tokens(tok, n_hay, seed, "eval").tolist()
    at = int(depth * n_hay)
    return np.asarray(pre + hay[:at] + needle + hay[at:] + post, np.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "sparse"))
def greedy(params, prompts, roles, cfg: ModelConfig, sparse: SparseConfig, w_q=None, w_k=None):
    """int32 [B, GEN_TOKENS] greedy continuation, recomputing a fixed-size buffer (no cache; causal).

    w_q, w_k: indexer [L, N, H, I] for prefill_mode="indexer" (None: retrieval heads dense)."""
    b, t = prompts.shape
    buf = jnp.concatenate([prompts, jnp.zeros((b, GEN_TOKENS), prompts.dtype)], axis=1)
    ix = None if w_q is None else {"w_q": w_q, "w_k": w_k}
    attn = rtpurbo_attn_fn(cfg, sparse)

    def step(i, buf):
        h = forward(params, buf, cfg, attn_fn=attn, layer_data=(roles, ix), return_hidden=True)
        last = jax.lax.dynamic_slice_in_dim(h, t + i - 1, 1, axis=1)
        nxt = logits_from_hidden(params, last, cfg).argmax(-1).astype(buf.dtype)
        return jax.lax.dynamic_update_slice_in_dim(buf, nxt, t + i, axis=1)

    return jax.lax.fori_loop(0, GEN_TOKENS, step, buf)[:, t:]


def run(args) -> dict:
    from convert import load_source

    cfg, params, tok = load_source(args.model, dtype=args.dtype)
    params = jax.tree.map(jnp.asarray, params)
    t0 = time.time()
    calib = CalibConfig(ratio=args.ratio, calib_len=args.calib_len, calib_docs=args.calib_docs, window=512,
                        seed=args.seed)
    report = calibrate_model(params, cfg, calib, tok,
                             progress=lambda i, n: print(f"[passkey] calibration doc {i}/{n} ({time.time() - t0:.0f}s)",
                                                         flush=True))
    calibrated = np.asarray(report["roles"], bool)
    kv_roles = select_roles(np.asarray(report["needle_score"]), head_count(args.ratio, calibrated.size), "kv",
                            cfg.group_size, False)
    print(f"[passkey] calibrated: {calibrated.sum()} heads (kv: {kv_roles.sum()}), {time.time() - t0:.0f}s", flush=True)
    rng = np.random.default_rng(args.seed + 1)
    random_roles = np.zeros(calibrated.size, bool)
    random_roles[rng.choice(calibrated.size, int(calibrated.sum()), replace=False)] = True
    random_roles = random_roles.reshape(calibrated.shape)
    configs = [("full", np.ones_like(calibrated), 512)]
    for w in args.windows:
        configs += [(f"calibrated_w{w}", calibrated, w), (f"random_w{w}", random_roles, w),
                    (f"calibrated_kv_w{w}", kv_roles, w)]
    results = {name: {} for name, _, _ in configs}
    for length in args.lengths:
        keys = [f"{k:05d}" for k in np.random.default_rng(length).integers(10000, 100000, args.prompts)]
        depths = np.linspace(0.05, 0.95, args.prompts)
        prompts = np.stack([build_prompt(tok, length, k, d, 1000 * length + i)
                            for i, (k, d) in enumerate(zip(keys, depths))])
        for name, roles, w in configs:
            sp = SparseConfig(roles=np.ones_like(calibrated), window=w, sinks=4, seqlen_threshold=0)
            outs = []
            for s in range(0, len(prompts), args.batch):
                outs.append(np.asarray(greedy(params, jnp.asarray(prompts[s:s + args.batch]), jnp.asarray(roles),
                                              cfg, sp)))
            texts = [tok.decode(o) for o in np.concatenate(outs)]
            correct = [k in t.replace(" ", "") for k, t in zip(keys, texts)]
            mem = kv_cache_bytes(roles, cfg.num_kv_heads, cfg.head_dim, length, sinks=4, window=w, index_dim=0)
            results[name][str(length)] = {"accuracy": float(np.mean(correct)), "correct": int(sum(correct)),
                                          "prompts": len(keys), "kv_bytes": mem["rtpurbo"], "dense_kv_bytes": mem["dense"],
                                          "kv_ratio": mem["ratio"], "samples": texts[:3]}
            print(f"[passkey] {length:>5} {name:<22} acc {np.mean(correct):.2f}  kv {mem['ratio']:.3f} of dense "
                  f"({time.time() - t0:.0f}s)", flush=True)
    return {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
            "date": datetime.date.today().isoformat(), "model": os.path.basename(args.model),
            "retrieval_heads": int(calibrated.sum()), "total_heads": int(calibrated.size),
            "dtype": args.dtype, "roles_query": calibrated.astype(int).tolist(),
            "roles_kv": kv_roles.astype(int).tolist(), "random_roles": random_roles.astype(int).tolist(),
            "calibration": {k: report[k] for k in ("stability", "agreement", "calib", "needle_score",
                                                    "needle_score_per_doc", "longrange_score")},
            "results": results}


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(res["results"])
    lengths = list(res["results"][names[0]])
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        acc = [res["results"][n][L]["accuracy"] for L in lengths]
        ax.bar(np.arange(len(lengths)) + i * width, acc, width, label=n)
    ax.set_xticks(np.arange(len(lengths)) + 0.4 - width / 2, [f"{int(L) // 1024}K" for L in lengths])
    ax.set_ylabel("pass-key accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{res['model']}: {res['retrieval_heads']}/{res['total_heads']} heads full, rest 4 sinks + window "
                 f"({res['device']})", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    from convert.bundled import smollm2_gguf

    p = argparse.ArgumentParser(prog="python -m benchmarks.passkey", description=__doc__)
    p.add_argument("--model", default=None, help="GGUF / HF dir (default: bundled SmolLM2)")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--windows", type=int, nargs="+", default=[256, 512])
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--ratio", type=float, default=0.15)
    p.add_argument("--calib-len", type=int, default=8192)
    p.add_argument("--calib-docs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and activations")
    p.add_argument("--out", default="benchmarks/results/passkey_smollm2")
    add_overwrite(p)
    args = p.parse_args(argv)
    claim(p, [args.out + ".json"], args.overwrite)
    args.model = args.model or smollm2_gguf()
    res = run(args)
    write_json(args.out + ".json", res)
    plot(res, args.out + ".png")
    print(f"[passkey] wrote {args.out}.json / .png")


if __name__ == "__main__":
    main()
