"""`python -m train.distill`: stage-1 indexer distillation (RTPurbo §5), sharded and resumable.

Backbone frozen; only the retrieval heads' indexer maps train, by forward KL to each head's own attention
(`train.objective`). The frozen forward that gives each step the heads' q and k runs its attention through the
device's kernel (the op's backend None; the reference on CPUs), per shard of the mesh (`shard_map`). With no
flags it runs the embedded default on CPU: SmolLM2-135M (converted and calibrated into the run directory on
first use), 512-token windows of the bundled corpus, a few dozen steps, then prints recall, blocks visited
against the oracle, and needle accuracy (full attention, indexer before and after) through the serving API.
Held-out evaluation (text the run never trains on): retrieval events in eval-split prose (`heldout_*`) and, for
windows of >= 512 tokens, prompts of the accuracy suite's kinds over the eval split at the rows that predict their
answers (`heldout_tasks_*`: the needle-block hit where the suite's questions are answered).

Outputs under --run-dir: config.json (resolved), converted/ (when converting), checkpoints/<step>/ (Orbax,
atomic, keep-K), metrics.jsonl, curves.png, indexer/ (final [L, N, H, I] maps, Orbax).
Pod use: gcloud compute tpus tpu-vm ssh NAME --worker=all --command "python -m train.distill --model DIR ..."
Stage 2 (the model's weights in sparse mode against its dense self): `python -m train.distill --stage 2 --help`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from rtpurbo_jax.checkpoint import CheckpointError, load_converted, write_params
from rtpurbo_jax.cli import run_cli
from rtpurbo_jax.evals.decoding import needle_accuracy
from rtpurbo_jax.indexer import full_layout, key_groups
from rtpurbo_jax.model import forward, full_attention
from rtpurbo_jax.params import param_shardings
from rtpurbo_jax.sparse_config import SparseConfig
from train.trainer import (RunFlags, check_fingerprint, config_from_argv, first_metrics_row,
                           init_distributed, log0, make_mesh, open_checkpoints, plot_curves,
                           read_metrics, run_loop, sync, write_run_config)
from train.data import (MIN_TASK_LEN, Prefetch, StepMix, held_out_retrieval, held_out_tasks, load_windows,
                        parse_lengths)
from train.objective import (INITS, LOSS_LEVELS, LOSS_WEIGHTS, gather_heads, init_rows, kl_loss,
                             recall_metrics, share_keys)


@dataclasses.dataclass(frozen=True)
class DistillConfig(RunFlags):
    model: str = "smollm2"  # converted dir, HF dir, .gguf, or smollm2 (bundled)
    run_dir: str = "runs/distill-smollm2"
    data: str = "kjv"  # kjv (bundled), a .txt, a dir of .txt, a .jsonl, or a .npy of token ids
    events: float = 1.0  # retrieval events written into each window per 1K tokens (train.data.insert_events); 0: none
    loss_level: str = "block"  # token (the paper's eq. 6) or block (KL of 64-token block masses)
    loss_weight: str = "longrange"  # uniform, or longrange (rows weighted by the teacher's far mass)
    local_prior: str = "query"  # query: learn the forced blocks' log-mass bias (linear in pre-RoPE q); none
    seq_len: int = 512
    length_mix: str = ""  # window lengths cycled step by step, e.g. 1024,2048,4096,8192 (each <= --seq-len); "": --seq-len
    batch: int = 1  # global batch (sequences per step)
    steps: int = 30
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    index_dim: int = 16
    init: str = "pca"  # best start and end of the three on SmolLM2 (benchmarks/results/distill_init_comparison_cpu.json)
    share_index_keys: bool = False  # one key map per KV group: the retrieval heads of a layer reading one KV head share
    # w_k (trained as one map), so their index keys are one array per KV group — G x fewer index-key bytes for serving
    # to exploit (the exported layout stays per head, rows equal); an experiment, not a default
    top_p: float = 0.9
    kv_block: int = 64
    chunk: int = 256
    log_every: int = 5
    ckpt_every: int = 10
    calib_len: int = 2048  # when converting on first use
    eval_passkey: int = 2  # needle prompts for the full / before / after check through serving (0 skips)
    eval_len: int = 0  # needle prompt length; 0: the local window + 384, needles placed past the window from the question
    eval_lengths: str = ""  # after training, held-out retrieval rows also at these lengths (e.g. 1024,4096,8192)

    def validate(self, max_positions: int | None = None):
        if self.steps < 1 or self.batch < 1 or self.seq_len < 2 or self.log_every < 1 or self.ckpt_every < 1:
            raise ValueError("--steps, --batch, --log-every, --ckpt-every must be >= 1 and --seq-len >= 2")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.init not in INITS:
            raise ValueError(f"--init must be one of {INITS}, got {self.init!r}")
        if self.loss_level not in LOSS_LEVELS or self.loss_weight not in LOSS_WEIGHTS:
            raise ValueError(f"--loss-level must be one of {LOSS_LEVELS} and --loss-weight one of {LOSS_WEIGHTS}")
        if self.local_prior not in ("query", "none"):
            raise ValueError(f"--local-prior must be 'query' or 'none', got {self.local_prior!r}")
        if not 0 <= self.events < float("inf"):
            raise ValueError(f"--events must be a finite number >= 0, got {self.events}")
        if not (0 < self.lr < float("inf")) or self.warmup < 0 or self.index_dim < 1:
            raise ValueError(f"--lr must be a finite number > 0 (got {self.lr}), --warmup >= 0, --index-dim >= 1")
        if not (0 < self.grad_clip < float("inf")):
            raise ValueError(f"--grad-clip must be a finite number > 0, got {self.grad_clip}")
        if not (0 <= self.weight_decay < float("inf")):
            raise ValueError(f"--weight-decay must be a finite number >= 0, got {self.weight_decay}")
        if self.kv_block < 1 or self.chunk < 1 or self.keep < 1:
            raise ValueError(f"--kv-block, --chunk and --keep must be >= 1, got {self.kv_block}, {self.chunk}, {self.keep}")
        if self.eval_len < 0 or self.eval_passkey < 0:
            raise ValueError(f"--eval-len and --eval-passkey must be >= 0, got {self.eval_len}, {self.eval_passkey}")
        if max_positions is not None and self.seq_len > max_positions:
            raise ValueError(f"--seq-len {self.seq_len} exceeds the model's {max_positions} positions")
        self.mix_lengths()
        self.eval_length_list(max_positions or 1 << 30)

    def mix_lengths(self) -> tuple[int, ...]:
        """--length-mix's window lengths (each <= --seq-len), () for none."""
        return parse_lengths(self.length_mix, "--length-mix", self.seq_len)

    def eval_length_list(self, max_positions: int) -> tuple[int, ...]:
        """--eval-lengths (each <= the model's positions), () for none."""
        return parse_lengths(self.eval_lengths, "--eval-lengths", max_positions)


def parse_args(argv=None) -> DistillConfig:
    return config_from_argv(DistillConfig, argv, "python -m train.distill", __doc__)


CURVES = {"recall": "recall @ top-p", "selected_frac": "indexer blocks", "oracle_frac": "oracle blocks",
          "heldout_top_hit": "needle-block hit (held-out)", "heldout_recall": "recall (held-out)",
          "heldout_tasks_top_hit": "needle-block hit (held-out task prompts)"}

# flags that define a run: a --resume must repeat them (others, like --log-every, may change)
FINGERPRINT = ("model", "data", "seq_len", "length_mix", "batch", "steps", "lr", "warmup", "weight_decay", "grad_clip", "index_dim",
               "init", "kv_block", "events", "loss_level", "loss_weight", "local_prior", "seed", "top_p",
               "share_index_keys")


def prepare_model(c: DistillConfig):
    """A converted checkpoint with roles: `c.model` itself, or converted + calibrated into run_dir/converted."""
    if os.path.exists(os.path.join(c.model, "rtpurbo.json")):
        path = c.model
    else:
        path = os.path.join(c.run_dir, "converted")
        if os.path.exists(os.path.join(path, "rtpurbo.json")):
            from convert.pipeline import resolve_model_path
            from rtpurbo_jax.checkpoint import read_meta

            made_from, want = read_meta(path).get("source"), resolve_model_path(c.model)
            if made_from and os.path.realpath(made_from) != os.path.realpath(want):
                raise ValueError(f"{path} was converted from {made_from}, not --model {want}; use another --run-dir")
        else:
            from convert.pipeline import RoleOptions, convert

            if jax.process_index() == 0:
                convert(c.model, path, log=log0, roles=RoleOptions(calib_len=c.calib_len, calib_docs=2, seed=c.seed))
    sync("rtpurbo-converted")  # the other processes wait until process 0 has written the converted checkpoint
    ckpt = load_converted(path)
    if not ckpt.meta.get("sparse_config"):
        raise CheckpointError(f"{path} has no retrieval-head roles; convert it with calibration "
                              "(python -m convert without --no-calibrate)")
    return ckpt, SparseConfig.from_dict(ckpt.meta["sparse_config"])


def make_teacher(cfg, heads, backend: str | None = "reference", mesh=None):
    """tokens -> per retrieval head q, k (post-RoPE) and q_pre, k_pre, each [R, B, T, H]; no gradient. backend,
    mesh: the frozen forward's attention (`model.full_attention`; training passes None — the device's kernel —
    and its mesh)."""

    def teacher(params, tokens):
        _, col = forward(params, tokens, cfg, collect=("q", "k", "q_pre", "k_pre"), return_hidden=True,
                         attn_fn=full_attention(cfg, backend=backend, mesh=mesh))
        return jax.lax.stop_gradient(gather_heads(col, heads, cfg.group_size))

    return teacher


def build_step(cfg, heads, tx, chunk, shardings, loss_kw=None, teacher_backend: str | None = "reference", mesh=None,
               shared_keys=None):
    """(jitted train step with NamedSharding in/out and donated state, jitted evaluation). loss_kw: kl_loss's
    level / weight / kv_block / sinks / recent; teacher_backend, mesh: `make_teacher`'s; shared_keys (int [R],
    `indexer.key_groups`): w_k shared per KV group — its gradient summed over the group, so rows that start
    equal stay equal (AdamW and clipping act elementwise / uniformly)."""
    teacher = make_teacher(cfg, heads, teacher_backend, mesh)
    loss_kw = loss_kw or {}

    def step(state, params, tokens):
        hx = teacher(params, tokens)
        loss, grads = jax.value_and_grad(lambda p: kl_loss(p, hx, chunk, **loss_kw))(state["params"])
        if shared_keys is not None:
            grads = share_keys(grads, shared_keys, reduce=True)
        updates, opt = tx.update(grads, state["opt_state"], state["params"])
        new = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt}
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    def evaluate(train, params, tokens, top_p, kv_block, rows=None):
        hx = teacher(params, tokens)
        return {"loss": kl_loss(train, hx, chunk, **loss_kw),
                **recall_metrics(train, hx, top_p=top_p, kv_block=kv_block, rows=rows, sinks=loss_kw.get("sinks", 4),
                                 keep_recent=loss_kw.get("recent", 64))}

    state_sh, params_sh, tok_sh, rep = shardings
    step_j = jax.jit(step, in_shardings=(state_sh, params_sh, tok_sh), out_shardings=(state_sh, rep),
                     donate_argnums=(0,))
    eval_j = jax.jit(evaluate, static_argnums=(3, 4))
    return step_j, eval_j


def describe(m: dict) -> str:
    """One log line of an evaluation row."""
    out = (f"loss {m['loss']:.4f} recall {m['recall']:.3f} blocks {m['selected_frac']:.3f} "
           f"(oracle {m['oracle_frac']:.3f})")
    if "heldout_recall" in m:
        out += (f"; held-out retrieval rows: recall {m['heldout_recall']:.3f} needle-block hit "
                f"{m['heldout_top_hit']:.3f} blocks {m['heldout_selected_frac']:.3f} (oracle "
                f"{m['heldout_oracle_frac']:.3f})")
    if "heldout_tasks_top_hit" in m:
        out += (f"; held-out task prompts: needle-block hit {m['heldout_tasks_top_hit']:.3f} recall "
                f"{m['heldout_tasks_recall']:.3f} blocks {m['heldout_tasks_selected_frac']:.3f} (oracle "
                f"{m['heldout_tasks_oracle_frac']:.3f})")
    return out


def run(c: DistillConfig) -> dict:
    c.validate()
    init_distributed(c.coordinator, c.num_processes, c.process_id, c.skip_distributed)
    os.makedirs(c.run_dir, exist_ok=True)
    ckpt, sparse = prepare_model(c)
    cfg = ckpt.model_config
    c.validate(cfg.max_position_embeddings)
    mix = c.mix_lengths()
    for length, flag in [(c.seq_len, "--seq-len")] + [(x, "--length-mix") for x in mix]:
        if length <= sparse.sinks + sparse.keep_recent:
            raise ValueError(f"{flag} {length} leaves nothing to select: the first {sparse.sinks} and the last "
                             f"{sparse.keep_recent} tokens are always kept (sinks, keep_recent in rtpurbo.json)")
    heads = np.argwhere(sparse.roles_array).astype(np.int32)  # [R, 2] (layer, query head)
    tok, data = load_data(c, ckpt)
    if tok is None and c.eval_lengths:
        raise ValueError("--eval-lengths evaluates on held-out text, which needs the model's tokenizer (not --data .npy)")
    train_data = data if not mix else StepMix(
        [data if x == c.seq_len else load_windows(c.data, tok, x, c.seed, c.events) for x in mix], mix)
    mesh = make_mesh(c.mesh)
    r = len(heads)
    head_axis = "model" if r % mesh.shape["model"] == 0 else None
    rep = NamedSharding(mesh, P())
    train_sh = {k: NamedSharding(mesh, P(head_axis))
                for k in ("w_q", "w_k") + (("w_local", "b_local") if c.local_prior == "query" else ())}
    tok_sh = NamedSharding(mesh, P("data" if c.batch % mesh.shape["data"] == 0 else None))
    params_sh = param_shardings(cfg, mesh)
    params = jax.device_put(ckpt.params, params_sh)
    warmup = min(c.warmup, c.steps // 5)  # capped so that short runs still reach the peak learning rate
    sched = optax.warmup_cosine_decay_schedule(0.0, c.lr, warmup, max(c.steps, warmup + 1), 0.0)
    tx = optax.chain(optax.clip_by_global_norm(c.grad_clip), optax.adamw(sched, weight_decay=c.weight_decay))
    pcount, pidx = jax.process_count(), jax.process_index()

    host = Prefetch(lambda step: train_data.batch(step, c.batch, pidx, pcount))  # made while the device works

    def global_batch(step):
        return jax.make_array_from_process_local_data(tok_sh, host(step))

    def fixed_batch(i):  # --seq-len windows outside the training steps (the PCA init, the evaluation window)
        return jax.make_array_from_process_local_data(tok_sh, data.batch(i, c.batch, pidx, pcount))

    pca = f"the PCA init (one teacher pass of {c.seq_len} tokens), " if c.init == "pca" else ""
    log0(f"[distill] {r} retrieval heads: {pca}compiling the step and evaluating the start before the first step "
         f"(minutes on a CPU at long --seq-len)")
    t_prep = time.time()
    calib_x = (jax.jit(make_teacher(cfg, heads, None, mesh))(params, fixed_batch(10 ** 6)) if c.init == "pca"
               else None)
    groups = key_groups(heads, cfg.group_size) if c.share_index_keys else None
    train0 = init_rows(c.init, heads, cfg, c.index_dim, jax.random.key(c.seed), calib_x,
                       local_prior=c.local_prior == "query", groups=groups)
    if groups is not None:
        log0(f"[distill] --share-index-keys: {len(set(groups.tolist()))} key maps for {r} retrieval heads (serve "
             "with SparseConfig(shared_index_keys=True): the cache then holds one index key per group)")
    opt0 = tx.init(train0)
    state_sh = {"params": train_sh, "opt_state": jax.tree.map(lambda _: rep, opt0)}
    state = jax.device_put({"params": train0, "opt_state": opt0}, state_sh)
    loss_kw = dict(level=c.loss_level, weight=c.loss_weight, kv_block=c.kv_block, sinks=sparse.sinks,
                   recent=sparse.keep_recent)
    step_j, eval_j = build_step(cfg, heads, tx, c.chunk, (state_sh, params_sh, tok_sh, rep), loss_kw, None, mesh,
                                groups)

    loop = c.loop("distill")
    config = dataclasses.asdict(c)
    mngr, start, state = open_checkpoints(loop, state, state_sh, lambda: check_fingerprint(c.run_dir, config,
                                                                                             FINGERPRINT))
    write_run_config(loop, {**config, "retrieval_heads": r, "devices": jax.device_count(), "mesh": dict(mesh.shape)},
                     start)

    eval_tokens = fixed_batch(10 ** 6 + 1)  # a fixed training-distribution window, also used before and after
    ho_tasks = []
    if tok is not None:  # held-out prose with retrieval events: recall where retrieval happens
        ho_tokens, ho_rows = held_out_retrieval(tok, c.seq_len, c.seed)
        ho_tokens = jax.device_put(np.broadcast_to(ho_tokens, (c.batch, c.seq_len)), tok_sh)
        if c.seq_len >= MIN_TASK_LEN:  # and the accuracy suite's kinds of prompt (eval split) at their answer rows
            ho_tasks = [(jax.device_put(t, tok_sh), jnp.asarray(rows))
                        for t, rows in held_out_tasks(tok, c.seq_len, c.seed, c.batch)]

    def evaluate(step, state):
        train = state["params"]
        m = {k: float(v) for k, v in eval_j(train, params, eval_tokens, c.top_p, c.kv_block).items()}
        if tok is not None:
            ho = eval_j(train, params, ho_tokens, c.top_p, c.kv_block, jnp.asarray(ho_rows))
            m.update({f"heldout_{k}": float(v) for k, v in ho.items() if k != "loss"})
        if ho_tasks:
            hts = [eval_j(train, params, t, c.top_p, c.kv_block, rows) for t, rows in ho_tasks]
            m.update({f"heldout_tasks_{k}": float(np.mean([float(h[k]) for h in hts])) for k in hts[0] if k != "loss"})
        return {"step": step, **m}

    def evaluate_at(state, length: int) -> dict:
        """Held-out retrieval rows at another length (the needle check's: past the local window)."""
        t, rows = held_out_retrieval(tok, length, c.seed)
        t = jax.device_put(np.broadcast_to(t, (c.batch, length)), tok_sh)
        m = eval_j(state["params"], params, t, c.top_p, c.kv_block, jnp.asarray(rows))
        return {k: float(v) for k, v in m.items() if k != "loss"}

    first = first_metrics_row(loop, start)
    before = first if first is not None and "recall" in first else evaluate(start, state)
    log0(f"[distill] {r} retrieval heads, index_dim {c.index_dim}, init {c.init}, mesh {dict(mesh.shape)}, "
         f"teacher attention: the op's pick on {jax.default_backend()} (the reference on CPUs) per shard, "
         f"loss {c.loss_level}/{c.loss_weight}, {c.events} events per 1K tokens, windows of "
         f"{'/'.join(map(str, mix)) if mix else c.seq_len} tokens ({time.time() - t_prep:.0f}s); "
         f"before: {describe(before)}")
    state, stopped = run_loop(loop, state, mngr, start, lambda s, i: step_j(s, params, global_batch(i)), evaluate,
                              (lambda i: c.batch * train_data.length(i)) if mix else c.batch * c.seq_len,
                              rows=[before] if start == 0 else [])
    host.close()
    if stopped:
        return {"stopped_at": c.stop_at}
    return finish(c, ckpt, sparse, heads, state, before, evaluate, loop, tok, rep, evaluate_at)


def load_data(c: DistillConfig, ckpt):
    """(tokenizer or None, windows): `train.data.load_windows` of --data (pre-tokenized .npy ids, or text / jsonl
    / chat / tasks / the bundled corpus tokenized with the model's tokenizer; --events into prose)."""
    tok = None if c.data.endswith(".npy") else ckpt.tokenizer()
    return tok, load_windows(c.data, tok, c.seq_len, c.seed, c.events)


def finish(c: DistillConfig, ckpt, sparse, heads, state, before, evaluate, loop, tok, rep, evaluate_at=None) -> dict:
    """After the last step: evaluate, export the indexer (full layout) to RUN_DIR/indexer, draw the curves,
    run the needle check through serving, write summary.json."""
    cfg = ckpt.model_config
    after = evaluate(c.steps, state)
    indexer = full_layout(jax.device_get(state["params"]), heads, cfg)
    out = os.path.join(c.run_dir, "indexer")
    if jax.process_index() == 0 and os.path.exists(out):  # this run's own earlier output (e.g. before a --resume)
        import shutil
        shutil.rmtree(out)
    if jax.process_count() > 1:  # Orbax saves collectively: every process passes the same replicated global arrays
        sync("rtpurbo-indexer-dir")
        write_params(out, jax.device_put(indexer, rep))
    else:
        write_params(out, indexer)
    if jax.process_index() == 0:
        plot_curves([before] + read_metrics(loop), os.path.join(c.run_dir, "curves.png"), CURVES,
                    "KL (summed over retrieval heads)", ylim=(0, 1.02))
    summary = {"before": before, "after": after, "retrieval_heads": len(heads)}
    log0(f"[distill] after {c.steps} steps: {describe(after)}")
    for length in c.eval_length_list(cfg.max_position_embeddings) if evaluate_at else ():
        m = evaluate_at(state, length)
        summary.setdefault("heldout_by_length", {})[str(length)] = m
        log0(f"[distill] held-out retrieval rows at {length} tokens: recall {m['recall']:.3f} needle-block hit "
             f"{m['top_hit']:.3f} blocks {m['selected_frac']:.3f} (oracle {m['oracle_frac']:.3f})")
    length = c.eval_len or min(sparse.window + 384, cfg.max_position_embeddings - 16)
    if c.eval_passkey and tok is not None and length + 16 <= cfg.max_position_embeddings:
        sp = dataclasses.replace(sparse, seqlen_threshold=0, top_p=c.top_p)
        if evaluate_at is not None and length > c.seq_len:  # where the local heads are really local
            m = evaluate_at(state, length)
            summary["at_needle_length"] = m
            log0(f"[distill] at {length} tokens (local window {sparse.window}), held-out retrieval rows: recall "
                 f"{m['recall']:.3f} needle-block hit {m['top_hit']:.3f} blocks {m['selected_frac']:.3f} (oracle "
                 f"{m['oracle_frac']:.3f})")
        runs = {"full": (None, None), "after": (sp, indexer)}
        # needles early enough that the question is farther from them than the local window reaches (when the
        # prompt is long enough), so every prompt asks the retrieval heads, not the local ones
        depth = (0.0, max(0.0, (length - sparse.window - 192) / length))
        summary["needle"] = needle_accuracy(ckpt.params, cfg, tok, runs, length=length, prompts=c.eval_passkey,
                                            seed=c.seed, depth=depth, log=lambda m: log0(f"[distill] {m}"))
        summary["needle_length"] = length
        summary["needle_depth"] = depth
        needle = summary["needle"]
        if c.seq_len <= sparse.window and needle["after"]["accuracy"] < needle["full"]["accuracy"]:
            log0(f"[distill] this indexer trained on {c.seq_len}-token windows, inside the {sparse.window}-token local "
                 f"window, for {c.steps} steps: it has not learned to find needles past the window. The full recipe "
                 f"(--seq-len 8192, a few hundred steps, an accelerator) matches dense retrieval heads (README, "
                 f"'Does it answer like full attention?')")
    if jax.process_index() == 0:
        with open(os.path.join(c.run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    return summary


def main(argv=None) -> int:
    """`--stage 1` (the default: the indexer, this module) or `--stage 2` (`train.stage2`: the model's weights
    in sparse mode against its dense self)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    stage = "1"
    for i, a in enumerate(argv):
        if a == "--stage" and i + 1 < len(argv) or a.startswith("--stage="):
            stage = a.split("=", 1)[1] if "=" in a else argv[i + 1]
            argv = argv[:i] + argv[i + (1 if "=" in a else 2):]
            break
    if stage == "2":
        from train import stage2

        return stage2.main(argv)
    if stage != "1":
        print(f"error: --stage must be 1 or 2, got {stage!r}", file=sys.stderr)
        return 2
    return run_cli(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
