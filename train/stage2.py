"""`python -m train.distill --stage 2`: sparse-mode self-distillation of the model against its dense self
(RTPurbo §6, eq. 7).

The teacher is the converted model in full attention (`lm.apply(mode="full")` through the device's attention kernel
— the op's backend None, the reference on CPUs — per shard of the mesh); its top-k (10) logits on every training
batch are cached offline first (`train.teacher`). The student is the same model in sparse mode through
`lm.apply(mode="rtpurbo")` — the layer and planner serving runs: local heads on sinks + window, retrieval heads on
their frozen indexer's top-p blocks, planned per tile of `q_block` query rows as in indexer prefill (teacher-forced
positions: the paper is silent; a tile shares one plan, so a row may see blocks chosen for its tile-mates — it never
sees the future). Gradients reach the weights through exact attention over the selected blocks; the selection is not
differentiated. The attention differentiated (`--attn-backend`, `train_backend`): on GPUs the op's "triton" backend
(the Pallas forward kernel with Pallas backward kernels as its VJP), elsewhere "xla" (the plan walked block by block
in jnp, 16-bit inputs on tensor cores, fp32 accumulation, its own VJP); both pinned to the reference's gradients.
On a mesh of several devices the attention runs per shard (`shard_map`, sequences over "data"): XLA does not
partition a Pallas call, and would otherwise gather its inputs and attend over the whole batch on every device.
AdamW (lr 3e-6, 200 warm-up steps then constant, weight decay 0.01, grad-norm 1.0), global batch by gradient
accumulation (`--accumulate`), params and optimiser state FSDP-sharded over `data` (and heads over `model`). The run
uses the reusable trainer (`train.trainer`): Orbax keep-K checkpoints, exact resume, metrics.jsonl, progress with
tokens/s. Outputs in --run-dir: teacher/ (cache), checkpoints/, metrics.jsonl, summary.json (KL and top-k agreement
before / after on held-out windows) and `model/`, a converted checkpoint of the trained weights with the same roles
(serve it with its indexer), served sparse at every length unless `--dense-weight` or `--serve-threshold` says
otherwise (`train/stage2_export.py`: which step is exported, how it is served, the end-of-run warnings).

Data (`--data`, `train.data.load_windows`): prose (with `--events`, retrieval events whose recalled values are
marked), chat JSON-lines (assistant turns marked), or `tasks` (the accuracy suite's generators over the corpus's
train split, the answers marked). Where the data marks answers the loss covers those rows only (eq. 7's answer
span; `--positions all` for every row); held-out metrics are on the same rows, with `kl_all_rows` beside them,
`kl_dense` (the same weights with full attention against the teacher: how far the model drifts when served dense)
and `rest_mass` (the student's probability off the teacher's top-k, which eq. 7 leaves free). `--loss topk_tail`
trains eq. 7 with that rest of the vocabulary as an eleventh outcome (`train.teacher.topk_tail_kl_at`; the cache then
also holds the teacher's logsumexp; held-out `kl_tail`, and `--export best` picks by it). `--dense-weight W` adds W x
the same loss of the student served dense (`stage2_loss`), so that the dense path — what serving runs below
`seqlen_threshold` — stays near the teacher (`kl_dense`); it costs a second forward and backward per micro-step.

Several processes (hosts): each reads its rows of every batch, caches its own rows of the teacher's top-k and
writes its part of the exported model into the shared run directory (`tests/test_stage2_multiprocess.py`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from pallas_kernels.sparse_attention.api import DIFFERENTIABLE
from rtpurbo_jax.checkpoint import load_converted, load_indexer, model_name, read_meta
from rtpurbo_jax.cli import run_cli
from rtpurbo_jax.lm import apply
from rtpurbo_jax.model import logits_at, lse_from_hidden, topk_from_hidden
from rtpurbo_jax.model_config import ModelConfig
from rtpurbo_jax.params import SHARDING_RULES, param_shardings
from rtpurbo_jax.sparse_config import SparseConfig
from train.data import Prefetch, StepMix, load_windows
from train.stage2_export import drift_note, pick_export, regression_note, write_model
from train.teacher import (TeacherCache, rest_mass_at, top1_within_topk_at, topk_agreement_ids, topk_kl_at,
                           topk_tail_kl_at)
from train.trainer import (RunFlags, check_fingerprint, config_from_argv, first_metrics_row,
                           init_distributed, log0, make_mesh, open_checkpoints, plot_curves, read_metrics, run_loop,
                           write_run_config)

CURVES = {"kl": "KL (held-out)", "topk_agreement": "top-k overlap", "top1_within_topk": "top-1 within top-k"}

TRAINABLE = ("all", "attention", "no_embeddings")

LOSSES = ("topk", "topk_tail")


PAPER_GLOBAL_BATCH = 8  # RTPurbo's stage 2: global batch 8, micro-batch 1


@dataclasses.dataclass(frozen=True)
class Stage2Config(RunFlags):
    model: str = ""  # a converted checkpoint with roles (python -m convert, or a stage-1 run's converted/)
    indexer: str = ""  # the stage-1 run's indexer/ (frozen)
    run_dir: str = "runs/stage2"
    data: str = "kjv"  # train.data.load_windows: a .npy of ids, text, jsonl, chat jsonl, tasks[:NAME,..], kjv, or A+B
    # (sources in turn, step by step: tasks+kjv alternates task prompts, answer rows marked, with prose, every row)
    events: float = 0.0  # retrieval events written into prose windows per 1K tokens (their values marked answers)
    positions: str = "answer"  # answer: the loss on marked answer rows where the data marks them; all: every row
    seq_len: int = 2048
    batch: int = 1  # sequences per micro-step
    accumulate: int = 0  # micro-steps per optimiser step (global batch = batch x accumulate); 0: the paper's global
    # batch 8 (8 // batch, at least 1). Qwen2.5-0.5B lost 7.5 NIAH points at global batch 2 x 250 steps, none at 8 x 80
    steps: int = 600
    lr: float = 3e-6
    warmup: int = 200
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    top_k: int = 10
    loss: str = "topk"  # topk: eq. 7 (the paper; blind to mass the student moves off the teacher's top-k) |
    # topk_tail: eq. 7 plus the rest of the vocabulary as one outcome (the teacher's logsumexp cached beside its top-k)
    dense_weight: float = 0.0  # > 0: add this times the same loss of the student served dense (full attention), so
    # the weights keep the dense path too — what serving runs below seqlen_threshold. 0: the paper (sparse only)
    serve_threshold: int | None = None  # the exported model's seqlen_threshold (calls shorter than it serve every
    # head dense). None: 0 — served sparse at every length, the path stage 2 trained (the dense path drifts: on
    # Qwen2.5-0.5B a 16K prompt scored 72.5 served dense against 81.25 sparse after stage 2) — unless --dense-weight
    # > 0 trained the dense path too, which keeps the converted model's threshold
    top_p: float = 0.9
    trainable: str = "all"  # all | attention (q, k, v, o projections) | no_embeddings
    fsdp: bool = True  # shard params and optimiser state over the data axis
    remat: bool = True  # recompute each layer in the backward pass (activation memory of one layer)
    attn_backend: str = "auto"  # the student's block-sparse attention: auto (triton on GPUs, else xla) | triton | xla | reference
    eval_batches: int = 2  # held-out windows (after the training windows) per source: a mix A+B evaluates 2x as many
    export: str = "last"  # model/ holds the last step's weights, or "best": the lowest held-out KL among the start,
    # the kept checkpoints (--ckpt-every, --keep) and the last step (the start: the model as it came)

    @property
    def micro_steps(self) -> int:
        """Micro-steps per optimiser step: `accumulate`, or for 0 the paper's global batch 8 (8 // batch, >= 1)."""
        return self.accumulate or max(1, PAPER_GLOBAL_BATCH // self.batch)

    def validate(self) -> None:
        if not self.model or not self.indexer:
            raise ValueError("--model (a converted checkpoint with roles) and --indexer (stage 1's indexer/) are needed")
        if (self.steps < 1 or self.batch < 1 or self.accumulate < 0 or self.seq_len < 2 or self.top_k < 1
                or self.eval_batches < 1):
            raise ValueError("--steps, --batch, --top-k, --eval-batches must be >= 1, --accumulate >= 0 and "
                             "--seq-len >= 2")
        if not (0 < self.lr < float("inf")) or self.warmup < 0:
            raise ValueError(f"--lr must be a finite number > 0 (got {self.lr}) and --warmup >= 0")
        if not (0 < self.grad_clip < float("inf")) or not (0 <= self.weight_decay < float("inf")):
            raise ValueError("--grad-clip must be a finite number > 0 and --weight-decay >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.export not in ("last", "best"):
            raise ValueError(f"--export must be 'last' or 'best', got {self.export!r}")
        if self.positions not in ("answer", "all"):
            raise ValueError(f"--positions must be 'answer' or 'all', got {self.positions!r}")
        if not 0 <= self.events < float("inf"):
            raise ValueError(f"--events must be a finite number >= 0, got {self.events}")
        if self.serve_threshold is not None and self.serve_threshold < 0:
            raise ValueError(f"--serve-threshold must be >= 0 (0: sparse at every length), got {self.serve_threshold}")
        if not 0 <= self.dense_weight < float("inf"):
            raise ValueError(f"--dense-weight must be a finite number >= 0, got {self.dense_weight}")
        if self.loss not in LOSSES:
            raise ValueError(f"--loss must be one of {LOSSES}, got {self.loss!r}")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"--trainable must be one of {TRAINABLE}, got {self.trainable!r}")
        if self.attn_backend not in ("auto",) + DIFFERENTIABLE:
            raise ValueError(f"--attn-backend must be 'auto' or a differentiable backend {DIFFERENTIABLE}, "
                             f"got {self.attn_backend!r}")


FINGERPRINT = ("model", "indexer", "data", "events", "positions", "seq_len", "batch", "accumulate", "steps", "lr", "warmup", "weight_decay",
               "grad_clip", "top_k", "loss", "dense_weight", "top_p", "trainable", "seed")


def parse_args(argv=None) -> Stage2Config:
    return config_from_argv(Stage2Config, argv, "python -m train.distill --stage 2", __doc__)


def trainable_mask(params: dict, which: str) -> dict:
    """bool pytree: True for the weights stage 2 updates."""
    attn = {"wq", "wk", "wv", "wo", "bq", "bk", "bv", "bo", "q_norm", "k_norm"}

    def keep(path, _):
        names = {getattr(k, "key", None) for k in path}
        if which == "attention":
            return bool(names & attn)
        if which == "no_embeddings":
            return not names & {"embed", "lm_head"}
        return True

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(c: Stage2Config, params: dict):
    sched = (optax.join_schedules([optax.linear_schedule(0.0, c.lr, c.warmup), optax.constant_schedule(c.lr)],
                                  [c.warmup]) if c.warmup else optax.constant_schedule(c.lr))  # no warm-up: lr from step 0
    tx = optax.chain(optax.clip_by_global_norm(c.grad_clip), optax.adamw(sched, weight_decay=c.weight_decay))
    labels = jax.tree.map(lambda m: "train" if m else "frozen", trainable_mask(params, c.trainable))
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return optax.MultiSteps(tx, c.micro_steps) if c.micro_steps > 1 else tx


def state_rules(c: Stage2Config) -> dict:
    """Logical axis -> mesh axis for params, gradients and optimiser moments: with --fsdp the embedding axis is
    sharded over `data` too (every matrix is then split across all devices)."""
    return {**SHARDING_RULES, "embed": "data"} if c.fsdp else SHARDING_RULES


def train_backend(name: str) -> str:
    """The attention backend a step differentiates: `name`, or for "auto" the Triton kernels with their Pallas
    backward on GPUs (H200: 3.3-4.4x the xla walk's step, `benchmarks/results/stage2_step_h200_triton.json`) and
    the xla walk elsewhere (TPUs, CPUs: no Mosaic backward kernels yet)."""
    if name != "auto":
        return name
    return "triton" if jax.default_backend() == "gpu" else "xla"


def master_weights(params):
    """fp32 copies of the floating-point weights: the values AdamW updates (RTPurbo's lr of 3e-6 moves a weight by
    far less than half a bfloat16 ulp per step — ~1e-4 for a weight of 0.02 — so updating bf16 weights in place
    would leave the model unchanged)."""
    return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def cast_like(params, dtypes):
    """The model's weights from their masters: each leaf cast to its dtype in `dtypes` (a pytree of dtypes of the
    same structure; None leaves params as they are). The forward runs on these, so the exported checkpoint (the
    same cast) is exactly the model the last step trained."""
    return params if dtypes is None else jax.tree.map(lambda x, d: x.astype(d), params, dtypes)


def student_logits(params, tokens, cfg, sparse: SparseConfig, indexer: dict, remat: bool = False, at=None,
                   attn_backend: str = "xla", mesh=None):
    """The student's fp32 logits — [B, T, V], or [B, T, k] at ids `at` int [B, T, k] without ever building the
    [B, T, V] ones (the training step: eq. 7 needs the teacher's top-k ids only) — of the model in sparse mode
    with indexer prefill (`lm.apply`). attn_backend: a differentiable backend of the block-sparse op ("xla":
    blockwise with its own VJP; "reference": autodiff of the definition, fp32 scores of every pair). mesh: the
    attention runs per shard of it (sequences over "data": `attention.sequence_attention`)."""
    kw = dict(mode="rtpurbo", sparse=sparse, indexer=indexer, remat=remat, attn_backend=attn_backend, mesh=mesh)
    if at is None:
        return apply(params, tokens, cfg, **kw)
    return logits_at(params, student_hidden(params, tokens, cfg, sparse, indexer, remat, attn_backend, mesh), cfg, at)


def student_hidden(params, tokens, cfg, sparse: SparseConfig, indexer: dict, remat: bool = False,
                   attn_backend: str = "xla", mesh=None):
    """The student's final normed hidden states [B, T, D] (model dtype), as `student_logits` runs it."""
    return apply(params, tokens, cfg, mode="rtpurbo", sparse=sparse, indexer=indexer, remat=remat,
                 attn_backend=attn_backend, mesh=mesh, return_hidden=True)


def stage2_loss(p, ix, tokens, weights, teacher, *, cfg: ModelConfig, sparse: SparseConfig, remat: bool = False,
                attn_backend: str = "xla", mesh=None, loss: str = "topk", dense_weight: float = 0.0):
    """The stage-2 objective of params `p` (model dtypes): eq. 7 (`loss` "topk") or `topk_tail_kl_at` of the student
    in sparse mode against `teacher` = (top-k ids int [B, T, k], top-k logits fp32 [B, T, k][, logsumexp fp32
    [B, T] for "topk_tail"]) on the rows weighted by `weights` [B, T]; plus `dense_weight` x the same of the student
    served dense (full attention through the same differentiable `attn_backend`). Scalar fp32; never the [B, T, V]
    logits (the tail's logsumexp is taken in row chunks)."""
    t_ids, t_logits, *t_lse = teacher

    def of(hidden):  # the loss of one pass's normed hidden states
        at = logits_at(p, hidden, cfg, t_ids)
        if loss == "topk":
            return topk_kl_at(at, t_logits, weights)
        # the vocabulary's logsumexp only where a row is weighted (whole chunks of rows without one are skipped)
        return topk_tail_kl_at(at, lse_from_hidden(p, hidden, cfg, needed=weights != 0), t_logits, *t_lse, weights)

    value = of(student_hidden(p, tokens, cfg, sparse, ix, remat, attn_backend, mesh))
    if dense_weight:
        dense = apply(p, tokens, cfg, remat=remat, attn_backend=attn_backend, mesh=mesh, return_hidden=True)
        value = value + dense_weight * of(dense)
    return value


def build_step(cfg: ModelConfig, sparse: SparseConfig, tx, state_sh, tok_sh, ix_sh, remat: bool = True,
               attn_backend: str = "xla", dtypes=None, mesh=None, loss: str = "topk", dense_weight: float = 0.0):
    """The jitted stage-2 step (state, indexer, tokens, row weights, teacher top-k ids, teacher top-k logits
    [, teacher logsumexp for loss "topk_tail"]) -> (state, {loss, grad_norm}): `stage2_loss` (eq. 7 or the tail
    loss on the student in sparse mode — the frozen indexer selects — plus `dense_weight` x its dense twin),
    gradients, the optimiser; everything in the given shardings, the state donated. state["params"] are fp32
    masters when `dtypes` (the model's dtype per leaf) is given: the forward runs on them cast to those dtypes, and
    the gradients and updates are fp32. mesh: the attention runs per shard of it (`student_logits`). Also lowered
    for TPU pods in `tests/test_tpu_lowering.py`."""

    def loss_fn(p, ix, tokens, weights, *teacher):
        return stage2_loss(cast_like(p, dtypes), ix, tokens, weights, teacher, cfg=cfg, sparse=sparse, remat=remat,
                           attn_backend=attn_backend, mesh=mesh, loss=loss, dense_weight=dense_weight)

    def step(state, ix, tokens, weights, *teacher):
        value, grads = jax.value_and_grad(loss_fn)(state["params"], ix, tokens, weights, *teacher)
        updates, opt = tx.update(grads, state["opt_state"], state["params"])
        return ({"params": optax.apply_updates(state["params"], updates), "opt_state": opt},
                {"loss": value, "grad_norm": optax.tree.norm(grads)})

    n_teacher = 3 if loss == "topk_tail" else 2
    return jax.jit(step, in_shardings=(state_sh, ix_sh) + (tok_sh,) * (2 + n_teacher),
                   out_shardings=(state_sh, None), donate_argnums=(0,))


def run(c: Stage2Config) -> dict:
    c.validate()
    c = dataclasses.replace(c, accumulate=c.micro_steps)
    init_distributed(c.coordinator, c.num_processes, c.process_id, c.skip_distributed)
    os.makedirs(c.run_dir, exist_ok=True)
    cfg = ModelConfig.from_dict(read_meta(c.model)["model_config"])
    mesh = make_mesh(c.mesh)
    params_sh = param_shardings(cfg, mesh, state_rules(c))
    ckpt = load_converted(c.model, shardings=params_sh)  # each device reads its own shard: no full copy anywhere
    if not ckpt.meta.get("sparse_config"):
        raise ValueError(f"{c.model} has no retrieval-head roles; convert it with calibration first")
    if c.seq_len > cfg.max_position_embeddings:
        raise ValueError(f"--seq-len {c.seq_len} exceeds the model's {cfg.max_position_embeddings} positions")
    shipped = SparseConfig.from_dict(ckpt.meta["sparse_config"])
    name = model_name(ckpt.meta, c.model)
    sparse = dataclasses.replace(shipped, prefill_mode="indexer", top_p=c.top_p, seqlen_threshold=0)
    if c.seq_len <= sparse.sinks + sparse.window:
        log0(f"[stage2] warning: --seq-len {c.seq_len} <= sinks + window ({sparse.sinks} + {sparse.window}): the local "
             "heads see every key, so sparse mode differs from dense only through the retrieval heads' top-p; the KL "
             "starts near zero and the updates are mostly noise (on Qwen2.5-0.5B, window 8192, 8K windows at global "
             "batch 2 cost 7.5 NIAH points; benchmarks/results/stage2_qwen25coder05b_h100/). Train on longer windows.")
    indexer = load_indexer(c.indexer, cfg, shipped.index_dim)
    data = load_windows(c.data, None if c.data.endswith(".npy") else ckpt.tokenizer(), c.seq_len, c.seed, c.events)
    answers = data.marks_answers and c.positions == "answer"
    micro = c.steps * c.accumulate  # micro-batches the run consumes; evaluation windows come after them
    # --eval-batches per source: a mix's held-out windows take the sources in turn, so each gets as many as one
    # source alone would (with 2 sources and 4 windows in all, kl@tasks rested on ~20 answer rows)
    n_eval = c.eval_batches * (len(data.sources) if isinstance(data, StepMix) else 1)
    pidx, pcount = jax.process_index(), jax.process_count()
    if c.batch % pcount:
        raise ValueError(f"--batch {c.batch} must be a multiple of the {pcount} processes (each reads its rows)")
    tok_sh = NamedSharding(mesh, P("data" if c.batch % mesh.shape["data"] == 0 else None))
    glob = lambda x: jax.make_array_from_process_local_data(tok_sh, x)  # this process's rows -> the global batch

    host = Prefetch(lambda i: data.example(i, c.batch, pidx, pcount))  # made on the host while the device works

    def example(i):  # (tokens, row weights): the loss rows are the marked answers, or all rows
        t, w = host(i)
        return glob(t), glob(w if answers else np.ones_like(w))

    cache = TeacherCache(os.path.join(c.run_dir, "teacher"),
                         {"model": os.path.abspath(c.model), "data": c.data, "events": c.events, "seq_len": c.seq_len,
                          "batch": c.batch, "seed": c.seed, "top_k": c.top_k, "windows": micro + n_eval,
                          **({"tail": True} if c.loss == "topk_tail" else {}),
                          "teacher_attention": f"backend None per shard on {jax.default_backend()}",
                          **({"processes": pcount} if pcount > 1 else {})})
    tokenizer = ckpt.tokenizer() if ckpt.has_tokenizer else None
    params = ckpt.params  # the student starts as the teacher: the same (sharded) arrays serve both
    dense_hidden = lambda t, p: apply(p, t, cfg, attn_backend=None, mesh=mesh, return_hidden=True)
    cache.build(micro + n_eval, lambda i: glob(host(i)[0]),
                lambda t, p: topk_from_hidden(p, dense_hidden(t, p), cfg, c.top_k, lse=c.loss == "topk_tail"), log=log0,
                args=(params,),
                to_local=lambda x: multihost_utils.global_array_to_host_local_array(x, mesh, tok_sh.spec))
    teacher = lambda i: tuple(glob(x) for x in cache.get(i))  # this process's rows of step i's teacher top-k

    dtypes = jax.tree.map(lambda x: x.dtype, params)  # the model's dtypes: the forward's and the export's
    params = jax.jit(master_weights, out_shardings=params_sh)(params)
    ckpt = None  # the checkpoint's own arrays are not needed past the teacher
    tx = make_optimizer(c, params)
    state = {"params": params, "opt_state": jax.jit(tx.init)(params)}
    # optimiser moments follow their params' shardings (FSDP); scalars (step counts) are replicated
    rep = NamedSharding(mesh, P())
    state_sh = jax.tree.map(lambda x: x.sharding if isinstance(x.sharding, NamedSharding) else rep, state)
    state = jax.device_put(state, state_sh)
    ix = jax.device_put(indexer, rep)

    backend = train_backend(c.attn_backend)
    log0(f"[stage2] attention backend: {backend} (--attn-backend {c.attn_backend})")
    low = sorted({str(jnp.dtype(d)) for d in jax.tree.leaves(dtypes)} - {"float32", "int32"})
    if low:
        log0(f"[stage2] fp32 master weights: the model's {'/'.join(low)} weights are cast from them for every "
             "forward and for the export")
    step_j = build_step(cfg, sparse, tx, state_sh, tok_sh, rep, c.remat, backend, dtypes, mesh, c.loss, c.dense_weight)

    def metrics(p, ix, t, w, i, lg, *t_lse):  # on the loss rows (answers, or all), and KL on every row beside it
        p = cast_like(p, dtypes)  # from the hidden states, in row chunks: never the [B, T, V] logits
        hidden = student_hidden(p, t, cfg, sparse, ix, attn_backend=backend, mesh=mesh)
        s_at, (s_ids, _, s_lse) = logits_at(p, hidden, cfg, i), topk_from_hidden(p, hidden, cfg, i.shape[-1], lse=True)
        # the same student with full attention: 0 before training (it is the teacher), and how far the weights
        # drift from the dense model when served dense (Qwen, 32K windows: full attention -6.75 NIAH points)
        dense_at = logits_at(p, dense_hidden(t, p), cfg, i)
        # rest_mass: the student's probability off the teacher's top-k, which eq. 7 leaves free
        return {"kl": topk_kl_at(s_at, lg, w), "topk_agreement": topk_agreement_ids(s_ids, i, w),
                "top1_within_topk": top1_within_topk_at(s_at, w), "kl_all_rows": topk_kl_at(s_at, lg),
                "kl_dense": topk_kl_at(dense_at, lg, w), "rest_mass": rest_mass_at(s_at, s_lse, w),
                **({"kl_tail": topk_tail_kl_at(s_at, s_lse, lg, *t_lse, w)} if t_lse else {})}

    metrics_j = jax.jit(metrics)

    evaluated: dict = {}  # step -> its evaluation row, on every process (the last one is the summary's "after")

    # a mix (--data A+B): its held-out KL per source too, as kl@A / kl_all_rows@A (files by their base name)
    sources = [os.path.basename(x) or x for x in data.names] if isinstance(data, StepMix) else []

    def evaluate(step_no, state):
        rows = [metrics_j(state["params"], ix, *example(micro + j), *teacher(micro + j))
                for j in range(n_eval)]
        row = {"step": step_no, **{k: float(np.mean([r[k] for r in rows])) for k in rows[0]}}
        for i, src in enumerate(sources):
            mine = [r for j, r in enumerate(rows) if data.source_index(micro + j) == i]
            for k in ("kl", "kl_all_rows") if mine else ():
                row[f"{k}@{src}"] = float(np.mean([r[k] for r in mine]))
        evaluated[step_no] = row
        return row

    def train_step(state, i):  # optimiser step i = micro-steps i*A .. i*A + A - 1
        m = None
        for j in range(i * c.accumulate, (i + 1) * c.accumulate):
            state, m = step_j(state, ix, *example(j), *teacher(j))
        return state, m

    loop = c.loop("stage2")
    config = dataclasses.asdict(c)
    mngr, start, state = open_checkpoints(loop, state, state_sh,
                                          lambda: check_fingerprint(c.run_dir, config, FINGERPRINT))
    write_run_config(loop, {**config, "stage": 2, "devices": jax.device_count(), "mesh": dict(mesh.shape)}, start)
    first = first_metrics_row(loop, start)
    before = first if first is not None and "kl" in first else evaluate(start, state)
    log0(f"[stage2] {cfg.model_type} {cfg.num_layers} layers, {int(sparse.roles_array.sum())} retrieval heads, "
         f"trainable {c.trainable}, loss {c.loss}" + (f" + {c.dense_weight:g} x the dense student's" if c.dense_weight else "")
         + f" on {'answer rows' if answers else 'all rows'}, mesh {dict(mesh.shape)}; before: KL {before['kl']:.4f}, top-{c.top_k} agreement "
         f"{before['topk_agreement']:.3f} (top-1 within it {before['top1_within_topk']:.3f})")
    state, stopped = run_loop(loop, state, mngr, start, train_step, evaluate,
                              c.batch * c.accumulate * c.seq_len, rows=[before] if start == 0 else [])
    host.close()
    if stopped:
        return {"stopped_at": c.stop_at}
    after = evaluated.get(c.steps) or evaluate(c.steps, state)  # run_loop evaluates the last step it runs
    log0(f"[stage2] after {c.steps} steps: KL {after['kl']:.4f}, top-{c.top_k} agreement {after['topk_agreement']:.3f} "
         f"(top-1 within it {after['top1_within_topk']:.3f}), probability off the teacher's top-{c.top_k} "
         f"{before.get('rest_mass', float('nan')):.4f} -> {after['rest_mass']:.4f}"
         + (f", KL with that tail {before.get('kl_tail', float('nan')):.4f} -> {after['kl_tail']:.4f}"
            if "kl_tail" in after else "")
         + (f"; served dense, KL {after['kl_dense']:.4f} (before {before['kl_dense']:.4f})"
            if "kl_dense" in after and "kl_dense" in before else ""))
    objective = "kl_tail" if c.loss == "topk_tail" else "kl"  # the held-out figure of the loss trained
    # a resumed run's rows: the later win
    evals = {r["step"]: r for r in read_metrics(loop) + [after] if objective in r}
    step_out, params = pick_export(c, evals, state, mngr, objective,
                                   lambda: load_converted(c.model, shardings=params_sh).params, log0)
    write_model(c, cast_like(params, dtypes), cfg, shipped, name, tokenizer, step_out, log0)
    summary = {"before": before, "after": after, "exported": {"step": step_out, "kl": evals[step_out]["kl"],
                                                              objective: evals[step_out][objective]}}
    for note in (regression_note(before, after) if c.export == "last" else None,
                 drift_note(before, after, mixed=isinstance(data, StepMix)) if answers else None):
        if note:
            log0(f"[stage2] warning: {note}")
    if jax.process_index() == 0:
        plot_curves(read_metrics(loop) + [after], os.path.join(c.run_dir, "curves.png"), CURVES,
                    f"KL on the teacher's top-{c.top_k}")
        with open(os.path.join(c.run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    return summary


def main(argv=None) -> int:
    return run_cli(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
