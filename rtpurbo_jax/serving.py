"""Serving over the hybrid KV cache: chunked `prefill`, `decode_step`, and `generate`.

All three are jitted (configs static, the cache donated) and follow the input shardings: place params with
`params.param_shardings` and the cache with `kv_cache.cache_shardings` (heads on the `model` axis) and XLA
keeps them there. A cache split over "data" only makes `prefill` / `decode_step` run each layer's attention per
shard (`data_parallel_mesh`), since XLA would gather a Pallas kernel's inputs. Every layer runs
`model.decoder_layer` with `attention.cached_attention` — the same layer,
planner and ops as the full-sequence forward (`lm.apply`), whose semantics are documented once in
`rtpurbo_jax.planner`; with `sparse=None` the cache is dense and the model runs plain causal attention.

Layers run as an unrolled Python loop (each layer's cache has its own head split), tokens of a chunk at traced
positions, so one compilation serves every chunk and every decode step. A cache made with `init_cache(...,
scan=True)` (or `generate(..., scan_layers=True)`) stacks the layers of equal head split and serving scans over
layers instead, compiling one attention per split (SmolLM2's 30 layers have 9): the same results, less compile time;
`scan="padded"` stacks layers of equal full / local KV counts (SmolLM2: 4 groups), each full KV head's query heads
all in retrieval slots and the layer's real ones marked as data (more index-key bytes; see `kv_cache`);
`scan="uniform"` puts every layer in one stack (local KV heads kept whole up to the widest layer's full count: more
cache bytes, one compiled attention body, no switch). A decode step reads each layer of the stacked full-KV and
index buffers in place (the Triton decode and scoring kernels take the stack and the layer; `layer_scan`); a prefill
chunk still copies the layer's slice before its kernels (XLA does not alias a dynamic slice into a custom call), and
every layer's new rows are scattered into every group's stack. Padded / split scans run slower on GPUs (H100,
SmolLM2: 86 vs 48 ms per 2K-prompt call; `benchmarks/results/scan_probe_h100/`); the uniform stack has one group, so
no switch and no scatter into other stacks, and runs faster than the unrolled layers (44 vs 49.5 ms; compile 5.4-5.9
vs 27-29 s; `benchmarks/results/scan_probe_h100_uniform/`) but holds more cache bytes, so the default stays
unrolled.

Backends (`backend`): None lets each op pick for the device and log it — a prefill chunk runs the block-sparse
prefill op (`pallas_kernels.sparse_attention`: Mosaic GPU on Hopper when the plan fits it, else Triton; Mosaic
on TPUs), a decode step the sparse decode op (`pallas_kernels.sparse_decode`, plans from the fused selection
kernels on GPUs); on CPU both run their jnp reference. A backend name is honoured by both ops or refused;
`{"prefill": ..., "decode": ...}` names each. `interpret=True` runs Pallas backends in interpret mode. Local
KV heads (sinks + ring) run a band plan on the same prefill op over the unrolled ring in prefill, and a masked
jnp attention at decode and with the reference backend. The reference prefill op holds O(B · N · chunk ·
max_len) floats per layer. Keep max_len a multiple of kv_block so the kernels need no padded copy of the cache.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp

from pallas_kernels.block_plan import cdiv, is_concrete
from pallas_kernels.sparse_decode.api import default_backend
from pallas_kernels.sparse_attention.api import BACKENDS as PREFILL_BACKENDS
from pallas_kernels.sparse_decode.api import BACKENDS as DECODE_BACKENDS
from rtpurbo_jax import indexer as ixr
from rtpurbo_jax.attention import AttentionCall, Positions, cached_attention
from rtpurbo_jax.kv_cache import SCAN_MODES, HybridCache, cache_shardings, init_cache
from rtpurbo_jax.layer_scan import scan_layers
from rtpurbo_jax.model import decoder_layer, logits_from_hidden, rms_norm, rope_cos_sin
from rtpurbo_jax.model_config import ModelConfig
from rtpurbo_jax.sampling import SamplingConfig, sample
from rtpurbo_jax.sparse_config import SparseConfig

log = logging.getLogger(__name__)


def op_backends(backend) -> tuple[str | None, str | None]:
    """(prefill op backend, decode op backend) for serving's `backend` argument (checked; hashable).

    None: each op picks for the default device and logs it (prefill per plan: Mosaic GPU on Hopper when the
    plan fits it, else Triton; decode: Triton on GPUs, Mosaic on TPUs, the jnp reference on CPU). A name is
    honoured by both ops or refused; a dict {"prefill": ..., "decode": ...} names each op's backend."""
    if isinstance(backend, tuple) and len(backend) == 2:
        prefill_b, decode_b = backend
    elif isinstance(backend, dict):
        unknown = set(backend) - {"prefill", "decode"}
        if unknown:
            raise ValueError(f"backend dict keys must be 'prefill' and/or 'decode', got {sorted(unknown)}")
        prefill_b, decode_b = backend.get("prefill"), backend.get("decode")
    elif backend is None or isinstance(backend, str):
        prefill_b = decode_b = backend
    else:
        raise ValueError(f"backend must be None, a backend name or a dict per op, got {backend!r}")
    if prefill_b is not None and prefill_b not in PREFILL_BACKENDS:
        raise ValueError(f"prefill backend must be one of {PREFILL_BACKENDS} or None, got {prefill_b!r}")
    if decode_b is not None and decode_b not in DECODE_BACKENDS:
        raise ValueError(f"decode backend must be one of {DECODE_BACKENDS} or None, got {decode_b!r} (for Mosaic "
                         f"GPU prefill pass backend={{'prefill': 'mosaic_gpu', 'decode': 'triton'}} or None)")
    return prefill_b, decode_b


def _resolve(backends: tuple[str | None, str | None]) -> tuple[str | None, str]:
    """Resolve a None decode backend for the device (at trace time: logged once per compilation). The prefill
    op resolves None itself, per plan."""
    prefill_b, decode_b = backends
    if decode_b is None:
        decode_b = default_backend()
        log.info("serving: decode attention backend=%s (platform %s)", decode_b, jax.default_backend())
    return prefill_b, decode_b


def check_indexer(cfg: ModelConfig, sparse: SparseConfig | None, indexer: dict | None) -> None:
    """Raise ValueError unless `indexer` fits (needed when the retrieval heads use top-p anywhere)."""
    if sparse is None:
        return
    sparse.check_model(cfg.num_layers, cfg.num_heads, cfg.num_kv_heads)
    needs = sparse.selector == "indexer" and (sparse.top_p < 1.0 or sparse.max_blocks is not None
                                              or sparse.prefill_mode == "indexer")
    if indexer is None:
        if needs and sparse.roles_array.any():
            raise ValueError("retrieval heads select blocks with the indexer (top_p < 1 or prefill_mode='indexer') "
                             "but no indexer weights were given (indexer={'w_q', 'w_k'} from train.distill)")
        return
    ixr.check_indexer(indexer, cfg, sparse.index_dim)
    if sparse.shared_index_keys:
        bad = ixr.unshared_key_groups(indexer, sparse.roles_array, cfg.num_kv_heads)
        if bad:
            raise ValueError(f"shared_index_keys=True stores one index key per KV group, but the indexer's key maps "
                             f"differ between retrieval heads of one KV head at (layer, KV head) {bad[:4]}"
                             f"{' ...' if len(bad) > 4 else ''}: train it with --share-index-keys, or set "
                             "shared_index_keys=False")


def _run_tokens(params, cache: HybridCache, tokens, pos: Positions, indexer, cfg: ModelConfig,
                sparse: SparseConfig | None, call: AttentionCall):
    """Final normed hidden states [B, C, D] of C new tokens per sequence, the updated cache, and fp32 [B]: the
    mean over layers with retrieval heads of the mean over their retrieval heads of the fraction of visible
    key blocks visited (decode; 0 if none). Layers unrolled, or scanned when the cache stacks them."""
    layout = cache.layout
    cos, sin = rope_cos_sin(pos.q_pos, cfg.rope, cfg.head_dim)
    x = jnp.take(params["embed"], tokens, axis=0)
    if layout.scan:
        x, layers, frac = scan_layers(params, cache.layers, x, cos, sin, pos, indexer, cfg, sparse, call, layout)
    else:
        layers, fracs = [], []
        for li, (lc, ll) in enumerate(zip(cache.layers, layout.layers)):
            lp = jax.tree.map(lambda a: a[li], params["layers"])
            ix = ixr.layer_rows(indexer, li, ll.retrieval_q, cfg.head_dim, layout.index_dim)

            def attend(qkv):  # called at once, inside this iteration
                out, new_lc, frac = cached_attention(qkv, lc, ll, layout, cfg, sparse, ix, pos, call)
                return out, (new_lc, frac)

            x, _, (lc, frac) = decoder_layer(lp, x, cfg, cos, sin, attend)
            if frac is not None:
                fracs.append(frac)
            layers.append(lc)
        frac = jnp.stack(fracs).mean(0) if fracs else jnp.zeros((x.shape[0],), jnp.float32)
    x = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    return x, HybridCache(tuple(layers), pos.new_len, layout), frac


def _prefill(params, cache, tokens, lengths, indexer, cfg, sparse, chunk, backends=("reference", "reference"),
             interpret=False, mesh=None):
    b, t = tokens.shape
    indexer_mode = sparse is not None and sparse.prefill_mode == "indexer"
    unit = sparse.q_block if indexer_mode else 1
    chunk = min(chunk, cdiv(t, unit) * unit)
    if chunk % unit:
        raise ValueError(f"prefill chunk {chunk} must be a multiple of q_block={sparse.q_block} in indexer mode")
    nc = cdiv(t, chunk)
    tokens = jnp.pad(tokens, ((0, 0), (0, nc * chunk - t)))
    lengths = jnp.asarray(lengths, jnp.int32)
    start = cache.lengths
    total = start + lengths
    call = AttentionCall(decode=False, tile=sparse.q_block if indexer_mode else 1, dense_retrieval=not indexer_mode,
                         prefill_backend=backends[0], decode_backend=backends[1], interpret=interpret, chunk=chunk,
                         mesh=mesh)

    def body(carry, i):
        cache, last_h = carry
        rel = i * chunk + jnp.arange(chunk, dtype=jnp.int32)
        valid = rel[None] < lengths[:, None]
        pos = Positions(start[:, None] + rel[None], valid, cache.lengths, total)
        x, cache, _ = _run_tokens(params, cache, jax.lax.dynamic_slice_in_dim(tokens, i * chunk, chunk, axis=1), pos,
                                  indexer, cfg, sparse, call)
        idx = jnp.clip(lengths - 1 - i * chunk, 0, chunk - 1)
        here = (lengths - 1 >= i * chunk) & (lengths - 1 < (i + 1) * chunk)
        h = jnp.take_along_axis(x, idx[:, None, None], axis=1)[:, 0]
        return (cache, jnp.where(here[:, None], h, last_h)), None

    init = (cache, jnp.zeros((b, params["final_norm"].shape[-1]), params["final_norm"].dtype))
    (cache, last_h), _ = jax.lax.scan(body, init, jnp.arange(nc))
    return logits_from_hidden(params, last_h, cfg), cache


def check_call(cache: HybridCache, tokens, cfg: ModelConfig, sparse: SparseConfig | None, indexer, *,
               lengths=None) -> None:
    """The serving API's input checks (once per call, outside the compiled step; values only on concrete
    inputs, in one device-to-host read): shapes, token ids in [0, vocab), prompt lengths in 1..T, room in the
    cache, the indexer's fit. Raise ValueError naming the argument."""
    check_indexer(cfg, sparse, indexer)
    tokens = jnp.asarray(tokens)
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")
    b = cache.lengths.shape[0]
    want = 2 if lengths is not None else 1
    if tokens.ndim != want or tokens.shape[0] != b:
        raise ValueError(f"tokens must be int [{b}{', T' if want == 2 else ''}] for this cache of batch {b}, "
                         f"got shape {tokens.shape}")
    if lengths is not None and jnp.shape(lengths) != (b,):
        raise ValueError(f"lengths must be int [{b}], got shape {jnp.shape(lengths)}")
    if not is_concrete(tokens, cache.lengths, lengths):
        return
    new = jnp.ones((b,), jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
    stats = [x.astype(jnp.int32) for x in (tokens.min(), tokens.max(), new.min(), new.max(), (cache.lengths + new).max())]
    lo, hi, nmin, nmax, end = (int(v) for v in jax.device_get(jnp.stack(stats)))
    if lo < 0 or hi >= cfg.vocab_size:
        raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}) (the model's vocab), got [{lo}, {hi}]")
    if lengths is not None and (nmin < 1 or nmax > tokens.shape[1]):
        raise ValueError(f"lengths must lie in 1..{tokens.shape[1]} (the prompt width), got [{nmin}, {nmax}]")
    if end > cache.layout.max_len:
        raise ValueError(f"the cache holds {cache.layout.max_len} positions per sequence but this call would fill "
                         f"{end}: init_cache with a larger max_len")


@functools.partial(jax.jit, static_argnames=("cfg", "sparse", "chunk", "backend", "interpret", "mesh"),
                   donate_argnames=("cache",))
def _prefill_jit(params, cache, tokens, lengths, indexer, *, cfg, sparse, chunk, backend, interpret, mesh=None):
    return _prefill(params, cache, tokens, lengths, indexer, cfg, sparse, chunk, _resolve(backend), interpret, mesh)


def data_parallel_mesh(cache: HybridCache):
    """The mesh whose "data" axis splits `cache`'s batch when that is the only split of every buffer
    (`kv_cache.cache_shardings` on a mesh whose other axes have size 1; layers unrolled or stacked), else None.
    Serving then runs each layer's attention per shard (`AttentionCall.mesh`): XLA does not partition a Pallas
    kernel and would gather the whole cache onto every device. A cache also split over heads is left to XLA (see
    the README)."""
    first = getattr(cache.lengths, "sharding", None)  # decides the common single-device case in ~1 us
    if not isinstance(first, jax.sharding.NamedSharding) or first.mesh.size == 1:
        return None
    # a stacked buffer's batch axis follows its layers' axis
    return _data_only_mesh([getattr(x, "sharding", None) for x in jax.tree.leaves(cache.layers) if x.size],
                           batch_axis=1 if cache.layout.scan else 0)


def _data_only_mesh(shardings: list, batch_axis: int = 0):
    """The one mesh of `shardings` when each splits its `batch_axis` over "data" (of size > 1) and no other axis
    over any mesh axis of size > 1, else None."""
    if not shardings or not all(isinstance(sh, jax.sharding.NamedSharding) for sh in shardings):
        return None
    mesh = shardings[0].mesh
    if mesh.shape.get("data", 1) == 1:
        return None
    split = lambda a: a is not None and any(mesh.shape[n] > 1 for n in (a if isinstance(a, tuple) else (a,)))
    for sh in shardings:
        spec = tuple(sh.spec) + (None,) * (batch_axis + 5)
        if sh.mesh != mesh or spec[batch_axis] != "data" or any(split(a) for i, a in enumerate(spec) if i != batch_axis):
            return None
    return mesh


def prefill(params, cache: HybridCache, tokens, lengths, indexer=None, *, cfg: ModelConfig,
            sparse: SparseConfig | None = None, chunk: int = 512, backend: str | None = None,
            interpret: bool = False, check: bool = True):
    """Append right-padded prompts to the cache, `chunk` tokens at a time.

    tokens int [B, T]; lengths int [B] (1..T) valid tokens per row; the cache may already hold earlier turns
    (positions continue from `cache.lengths`). Returns fp32 logits [B, V] of each row's last prompt token and the
    cache with lengths += lengths. Prompt rows must fit: cache.lengths + lengths <= max_len (positions past it
    are dropped). backend: as `decode_step` (None: the device's kernels; "reference": jnp, memory per layer
    O(B · N · chunk · max_len)); on a GPU the full KV heads run the block-sparse prefill kernel.
    check: validate the inputs first (`check_call`; one small host read); pass False inside your own jit.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if check:
        check_call(cache, tokens, cfg, sparse, indexer, lengths=lengths)
    return _prefill_jit(params, cache, tokens, lengths, indexer, cfg=cfg, sparse=sparse, chunk=chunk,
                        backend=op_backends(backend), interpret=interpret, mesh=data_parallel_mesh(cache))


def _decode(params, cache, tokens, indexer, cfg, sparse, backends=("reference", "reference"), interpret=False,
            mesh=None):
    q_pos = cache.lengths[:, None]
    valid = jnp.ones_like(q_pos, bool)
    dense = sparse is None or (sparse.top_p >= 1.0 and sparse.max_blocks is None)
    call = AttentionCall(decode=True, tile=1, dense_retrieval=dense, prefill_backend=backends[0],
                         decode_backend=backends[1], interpret=interpret, mesh=mesh)
    pos = Positions(q_pos, valid, cache.lengths, cache.lengths + 1)
    x, cache, frac = _run_tokens(params, cache, tokens[:, None], pos, indexer, cfg, sparse, call)
    return logits_from_hidden(params, x[:, 0], cfg), cache, frac


@functools.partial(jax.jit, static_argnames=("cfg", "sparse", "backend", "interpret", "stats", "mesh"),
                   donate_argnames=("cache",))
def _decode_jit(params, cache, tokens, indexer, *, cfg, sparse, backend, interpret, stats, mesh=None):
    logits, cache, frac = _decode(params, cache, tokens, indexer, cfg, sparse, _resolve(backend), interpret, mesh)
    return (logits, cache, {"blocks_frac": frac}) if stats else (logits, cache)


def decode_step(params, cache: HybridCache, tokens, indexer=None, *, cfg: ModelConfig,
                sparse: SparseConfig | None = None, backend: str | None = None, interpret: bool = False,
                stats: bool = False, check: bool = True):
    """One token per sequence: tokens int [B] at position cache.lengths. Returns fp32 logits [B, V] and the cache
    (and with stats=True a dict: blocks_frac fp32 [B], the mean over retrieval heads of the fraction of visible
    64-token key blocks this step visited).

    Retrieval heads score every cached index key, keep their top-p blocks and attend exactly inside them.
    check: validate the inputs first (`check_call`: ids in range, room in the cache; one small host read per
    step); pass False in a latency-critical loop whose inputs you trust, or inside your own jit.
    """
    if check:
        check_call(cache, tokens, cfg, sparse, indexer)
    return _decode_jit(params, cache, tokens, indexer, cfg=cfg, sparse=sparse, backend=op_backends(backend),
                       interpret=interpret, stats=stats, mesh=data_parallel_mesh(cache))


def _stops(stop_tokens) -> jax.Array:
    return jnp.asarray(stop_tokens if stop_tokens else (-1,), jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "sparse", "sampling", "stop_tokens", "chunk", "max_len",
                                             "cache_dtype", "backend", "interpret", "scan_layers", "mesh"))
def _generate_prefill(params, prompts, lengths, indexer, key, *, cfg, sparse, sampling, stop_tokens, chunk, max_len,
                      cache_dtype, backend, interpret, scan_layers=False, mesh=None):
    """generate's first program: a new cache, the prompts' prefill, the first sampled token. Returns (first int
    [B], done bool [B], key, cache). mesh: a data-parallel mesh (`_prompts_mesh`): the cache is split over its
    "data" axis and each layer's attention runs per shard."""
    cache = init_cache(cfg, prompts.shape[0], max_len, sparse, cache_dtype, scan=scan_layers)
    if mesh is not None:
        cache = jax.lax.with_sharding_constraint(cache, cache_shardings(cache, mesh))
    logits, cache = _prefill(params, cache, prompts, lengths, indexer, cfg, sparse, chunk, _resolve(backend), interpret,
                             mesh)
    key, sub = jax.random.split(key)
    first = sample(logits, sub, sampling)
    return first, jnp.isin(first, _stops(stop_tokens)), key, cache


@functools.partial(jax.jit, static_argnames=("cfg", "sparse", "sampling", "max_new_tokens", "stop_tokens", "backend",
                                             "interpret", "mesh"), donate_argnames=("cache",))
def _generate_decode(params, cache, first, done, key, indexer, *, cfg, sparse, sampling, max_new_tokens, stop_tokens,
                     backend, interpret, mesh=None):
    """generate's second program: the decode loop after `_generate_prefill`. Returns (tokens int32 [B,
    max_new_tokens], num_tokens int32 [B], cache)."""
    backend = _resolve(backend)
    stops = _stops(stop_tokens)
    pad = stop_tokens[0] if stop_tokens else 0

    def step(carry, _):
        cache, tok, done, key, count = carry
        logits, cache, _ = _decode(params, cache, tok, indexer, cfg, sparse, backend, interpret, mesh)
        key, sub = jax.random.split(key)
        nxt = jnp.where(done, pad, sample(logits, sub, sampling))
        count = count + (~done).astype(jnp.int32)
        return (cache, nxt, done | jnp.isin(nxt, stops), key, count), nxt

    init = (cache, first, done, key, jnp.ones((first.shape[0],), jnp.int32))
    (cache, _, _, _, count), rest = jax.lax.scan(step, init, None, length=max_new_tokens - 1)
    return jnp.concatenate([first[:, None], rest.T], axis=1), count, cache


@dataclasses.dataclass(frozen=True)
class GenerateExecutables:
    """`generate`'s two compiled programs for one signature, and what building them took (wall seconds; their sum
    is the whole wait): lower_s (tracing + lowering both; the decode loop's XLA compile already runs beside the
    prefill's lowering), compile_s (from then until both are compiled), stablehlo_ops (of both; counted only when
    asked: `compile_generate(..., count_ops=True)`)."""

    prefill: object
    decode: object
    lower_s: float
    compile_s: float
    stablehlo_ops: int | None = None


_EXECUTABLES: collections.OrderedDict = collections.OrderedDict()  # signature -> GenerateExecutables (LRU)
_MAX_EXECUTABLES = 16


def _signature(args, static: dict) -> tuple:
    leaves, tree = jax.tree.flatten(args)
    return tree, tuple((tuple(x.shape), str(x.dtype)) for x in leaves), tuple(sorted(static.items()))


def _prefill_outputs(prompts, key, static: dict):
    """The shapes `_generate_prefill` returns — (first, done, key, cache) — without tracing it: the cache is
    `init_cache`'s (prefill writes into it, shapes unchanged), so the decode loop can be lowered first."""
    b = prompts.shape[0]
    cache = jax.eval_shape(lambda: init_cache(static["cfg"], b, static["max_len"], static["sparse"],
                                              static["cache_dtype"], scan=static["scan_layers"]))
    return (jax.ShapeDtypeStruct((b,), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.bool_),
            jax.eval_shape(lambda k: jax.random.split(k)[0], key), cache)


def _same_shapes(a, b) -> bool:
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    return ta == tb and all((x.shape, x.dtype) == (y.shape, y.dtype) for x, y in zip(la, lb))


def compile_generate(params, prompts, lengths, indexer, key, *, max_new_tokens: int, compiler_options=None,
                     concurrent: bool = True, count_ops: bool = False, **static) -> GenerateExecutables:
    """Lower and compile `generate`'s two programs (prefill + first token; the decode loop), **overlapped**: the
    decode loop is lowered first (its inputs' shapes come from `init_cache`, not from tracing the prefill) and
    compiled in a second thread (XLA compiles with the GIL released) while the prefill is lowered and compiled,
    so that a first call waits for about the first lowering plus the slower compile. Arguments as
    `_generate_prefill` / `_generate_decode` take them (the public `generate` calls this once per signature and
    caches the result; single-device inputs). compiler_options: XLA options for both; concurrent=False lowers
    and compiles one after the other (for measuring)."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.perf_counter()
    first, done, key2, cache = _prefill_outputs(prompts, key, static)
    dec = {k: static[k] for k in ("cfg", "sparse", "sampling", "stop_tokens", "backend", "interpret")}
    lo_d = _generate_decode.lower(params, cache, first, done, key2, indexer, max_new_tokens=max_new_tokens, **dec)
    with ThreadPoolExecutor(1) as pool:
        exe_d = pool.submit(lo_d.compile, compiler_options) if concurrent else None
        lo_p = _generate_prefill.lower(params, prompts, lengths, indexer, key, **static)
        if not _same_shapes(lo_p.out_info, (first, done, key2, cache)):  # a bug of _prefill_outputs (tested)
            log.warning("generate: the prefill's outputs differ from the shapes the decode loop was lowered for; "
                        "lowering it again from the prefill's")
            exe_d = None if exe_d is None else exe_d.result()  # (discarded)
            first, done, key2, cache = lo_p.out_info
            lo_d = _generate_decode.lower(params, cache, first, done, key2, indexer, max_new_tokens=max_new_tokens,
                                          **dec)
            exe_d = pool.submit(lo_d.compile, compiler_options) if concurrent else None
        t1 = time.perf_counter()
        exe_p = lo_p.compile(compiler_options)
        exe_d = exe_d.result() if concurrent else lo_d.compile(compiler_options)
    t2 = time.perf_counter()
    ops = sum(lo.as_text().count(" = ") for lo in (lo_p, lo_d)) if count_ops else None
    log.info("generate compiled: lower %.1f s, then compile %.1f s (decode compiling while prefill lowered)",
             t1 - t0, t2 - t1)
    return GenerateExecutables(exe_p, exe_d, t1 - t0, t2 - t1, ops)


def _prompts_mesh(prompts):
    """generate's data-parallel mesh: that of prompts split over "data" (rows) on a mesh whose other axes have
    size 1 (params may be split over them, and generate's cache would be), else None (`data_parallel_mesh` for a
    cache generate builds itself)."""
    mesh = _data_only_mesh([getattr(prompts, "sharding", None)])
    if mesh is None or any(n != "data" and mesh.shape[n] > 1 for n in mesh.axis_names):
        return None
    return mesh


def _on_default_device(tree) -> bool:
    """True when every array leaf lives on the default device alone (the case compile_generate serves)."""
    dev = jax.devices()[0]
    for x in jax.tree.leaves(tree):
        sharding = getattr(x, "sharding", None)
        if sharding is not None and sharding.device_set != {dev}:
            return False
    return True


def prompt_bucket(t: int, chunk: int) -> int:
    """The prompt width `generate` compiles for: the next power of two (at least 16) up to one prefill chunk, then
    whole chunks — so prompts of many lengths share a few compiled programs. Past one chunk this adds no prefill
    work (the prefill pads its last chunk anyway); below it, at most 2x a short prompt's."""
    if t > chunk:
        return -(-t // chunk) * chunk
    return min(max(16, 1 << (t - 1).bit_length()), chunk)


def generate(params, prompts, lengths, *, cfg: ModelConfig, max_new_tokens: int, sparse: SparseConfig | None = None,
             indexer: dict | None = None, sampling: SamplingConfig = SamplingConfig(), stop_tokens=(),
             key=None, chunk: int = 512, max_len: int | None = None, cache_dtype=None, backend: str | None = None,
             interpret: bool = False, scan_layers: bool | str = False):
    """Generate up to `max_new_tokens` per prompt: two jitted programs, the prefill with the first sampled token
    and the scanned decode loop. On a first call with inputs on the default device both are lowered and
    compiled overlapped (`compile_generate`: the decode loop compiles in a second thread while the prefill is
    lowered and compiled; the wait is about one lowering plus the slower compile, not the sum) and kept for later
    calls of the same signature; sharded inputs go through jit dispatch, which follows their shardings (prompts
    split over a mesh's "data" axis alone: the cache is split the same way and each layer's attention runs per
    shard).

    prompts int [B, T] right-padded, lengths int [B]; on the default device they are padded on to
    `prompt_bucket(T, chunk)` columns, so that prompts of many lengths share a few compiled programs (sharded
    prompts run as given); the padded width plus max_new_tokens stays within max_len, and within the model's
    max_position_embeddings when the call fits in it (the default max_len follows). stop_tokens: ids that end a
    row (the stop token is kept; later positions repeat the first stop id). Returns dict tokens int32
    [B, max_new_tokens], num_tokens int32 [B] (generated tokens up to and including a stop), cache (the final
    HybridCache). backend / interpret: the attention backend of prefill and decode (see the module docstring).
    scan_layers: stack the cache's layers
    and scan over them — True / "split": layers of equal head split (one compiled layer per split instead of one
    per layer), "padded": of equal full / local KV counts (fewer; padded retrieval slots), "uniform": all layers
    in one stack (one compiled layer; more cache bytes) — see the module docstring for what it costs on GPUs.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompts = jnp.asarray(prompts, jnp.int32)
    if prompts.ndim != 2:
        raise ValueError(f"prompts must be int [B, T], got shape {prompts.shape}")
    lengths = jnp.asarray(lengths, jnp.int32)
    if lengths.shape != prompts.shape[:1] or bool((lengths < 1).any()) or bool((lengths > prompts.shape[1]).any()):
        raise ValueError(f"lengths {lengths.tolist()} must be one value in 1..{prompts.shape[1]} per prompt row")
    need = prompts.shape[1] + max_new_tokens
    if max_len is not None and max_len < need:
        raise ValueError(f"max_len={max_len} is too small for prompts of {prompts.shape[1]} + {max_new_tokens} new tokens")
    if (max_len or need) > cfg.max_position_embeddings:
        log.warning("max_len %d exceeds the model's max_position_embeddings %d", max_len or need,
                    cfg.max_position_embeddings)
    check_indexer(cfg, sparse, indexer)
    if is_concrete(prompts):
        lo, hi = (int(v) for v in jax.device_get(jnp.stack([prompts.min(), prompts.max()])))
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(f"prompt token ids must lie in [0, {cfg.vocab_size}) (the model's vocab), got [{lo}, {hi}]")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if scan_layers not in SCAN_MODES:
        raise ValueError(f"scan_layers must be one of {SCAN_MODES}, got {scan_layers!r}")
    key = jax.random.key(0) if key is None else key
    on_default = _on_default_device((params, prompts, lengths, indexer, key))
    if on_default:  # one compile per prompt-length bucket
        t = prompts.shape[1]
        # the bucket never widens the cache past max_len, nor past the model's positions unless the call needs it
        cap = max_len if max_len is not None else max(need, cfg.max_position_embeddings)
        tb = min(prompt_bucket(t, chunk), cap - max_new_tokens)
        prompts = jnp.pad(prompts, ((0, 0), (0, tb - t)))  # right padding: `lengths` keeps the rows as they were
    max_len = prompts.shape[1] + max_new_tokens if max_len is None else max_len
    static = dict(cfg=cfg, sparse=sparse, sampling=sampling, stop_tokens=tuple(int(t) for t in stop_tokens),
                  chunk=chunk, max_len=max_len, cache_dtype=jnp.dtype(cache_dtype or params["embed"].dtype).name,
                  backend=op_backends(backend), interpret=interpret,
                  scan_layers="split" if scan_layers is True else scan_layers)
    args = (params, prompts, lengths, indexer, key)
    if on_default:  # both programs compiled overlapped on a first call, then reused
        sig = _signature(args, {**static, "max_new_tokens": max_new_tokens})
        exe = _EXECUTABLES.pop(sig, None) or compile_generate(*args, max_new_tokens=max_new_tokens, **static)
        _EXECUTABLES[sig] = exe
        while len(_EXECUTABLES) > _MAX_EXECUTABLES:
            _EXECUTABLES.popitem(last=False)
        first, done, key, cache = exe.prefill(*args)
        tokens, count, cache = exe.decode(params, cache, first, done, key, indexer)
    else:  # sharded inputs: jit dispatch follows their shardings (the two programs compile one after the other)
        mesh = _prompts_mesh(prompts)
        first, done, key, cache = _generate_prefill(*args, **static, mesh=mesh)
        dec = {k: static[k] for k in ("cfg", "sparse", "sampling", "stop_tokens", "backend", "interpret")}
        tokens, count, cache = _generate_decode(params, cache, first, done, key, indexer,
                                                max_new_tokens=max_new_tokens, mesh=mesh, **dec)
    return {"tokens": tokens, "num_tokens": count, "cache": cache}


__all__ = ["GenerateExecutables", "check_call", "check_indexer", "compile_generate", "data_parallel_mesh", "decode_step",
           "generate", "prefill", "prompt_bucket"]
