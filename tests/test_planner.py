"""The one planner: plans against the token-level definition, the fused decode kernel pinned to it, and the
one set of semantics (seqlen_threshold) shared by `lm.apply` and serving."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_plan import band_blocks, band_selection, plan_to_dense_mask
from pallas_kernels.sparse_decode.plan import decode_token_mask
from rtpurbo_jax import planner
from rtpurbo_jax.kv_cache import init_cache
from rtpurbo_jax.lm import apply
from rtpurbo_jax.model import forward
from rtpurbo_jax.model_config import ModelConfig
from rtpurbo_jax.params import init_params
from rtpurbo_jax.serving import decode_step, op_backends, prefill
from rtpurbo_jax.sparse_config import SparseConfig
from tests.conftest import assert_logits_close

CFG = ModelConfig(model_type="llama", vocab_size=96, hidden_size=48, intermediate_size=64, num_layers=2,
                  num_heads=6, num_kv_heads=2, head_dim=8, max_position_embeddings=512)
ROLES = [[0, 1, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1]]


def _band_tokens(q_pos, s, sinks, window):
    k = np.arange(s)
    return (k <= q_pos) & ((k < sinks) | (q_pos - k < window))


@pytest.mark.parametrize("c,s,start,qb,kb,sinks,window", [(37, 130, 0, 16, 16, 4, 24), (20, 77, 41, 8, 16, 0, 9),
                                                           (64, 64, 0, 32, 8, 3, 1000)])
def test_chunk_plan_is_the_token_definition(c, s, start, qb, kb, sinks, window):
    """Local heads see exactly sinks + window causal tokens, dense retrieval heads every causal token, inside
    kv_len; query rows start at a traced offset (a later prefill chunk)."""
    is_r = np.array([0, 1, 0, 1])
    kv_len = min(s, start + c)
    plan = planner.chunk_plan(is_r, (1, 3), None, jnp.asarray([start]), c, s, jnp.asarray([kv_len]),
                              jnp.int32(sinks), jnp.int32(window), q_block=qb, kv_block=kb)
    got = np.asarray(plan_to_dense_mask(plan, c, s))[0]
    for n in range(4):
        for t in range(c):
            q = start + t
            want = _band_tokens(q, s, 0 if is_r[n] else sinks, 10 ** 9 if is_r[n] else window) & (np.arange(s) < kv_len)
            np.testing.assert_array_equal(got[n, t], want, err_msg=f"head {n} row {t}")


def test_band_blocks_numpy_and_jnp_agree():
    q_lo, q_hi = np.array([0, 50, 130]), np.array([15, 70, 130])
    a = band_blocks(q_lo, q_hi, 10, 16, 4, 33, kv_len=150)
    assert isinstance(a, np.ndarray)
    b = band_blocks(jnp.asarray(q_lo), jnp.asarray(q_hi), 10, 16, 4, 33, kv_len=150)
    np.testing.assert_array_equal(a, np.asarray(b))
    np.testing.assert_array_equal(band_selection(1, 40, 150, sinks=4, window=33, q_block=16, kv_block=16)[0],
                                  band_blocks(np.arange(3) * 16, np.minimum(np.arange(1, 4) * 16, 40) - 1, 10, 16,
                                              4, 33, kv_len=150))


@pytest.mark.parametrize("seed,p", [(0, 0.7), (1, 0.95)])
def test_fused_decode_kernel_is_pinned_to_the_planner(seed, p):
    """decode_step_plan with the fused Triton selection (interpret mode) builds the planner's reference plan:
    mixed retrieval / local heads in one group, a dense call, the local band."""
    rng = np.random.default_rng(seed)
    b, s, r = 2, 300, 2
    is_r = np.array([0, 1, 0, 0, 1, 0, 0, 0])
    sp = SparseConfig(roles=[is_r.tolist()], sinks=4, window=40, kv_block=16, top_p=p, keep_recent=16,
                      seqlen_threshold=0)
    q = jnp.asarray(rng.normal(size=(b, r, 8)) * 1.5, jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, s, r, 8)), jnp.float32)
    kv_len = jnp.asarray([s, 211])
    for dense in (False, True):
        kw = dict(num_kv_heads=2, num_keys=s, dense=jnp.asarray(dense))
        sinks, window = planner.local_band(sp, CFG, jnp.asarray(dense))
        want = planner.decode_step_plan(is_r, q, k, None, kv_len, sinks, window, sp, **kw)
        got = planner.decode_step_plan(is_r, q, k, None, kv_len, sinks, window, sp, selection_backend="triton",
                                       interpret=True, **kw)
        np.testing.assert_array_equal(np.asarray(decode_token_mask(got, s)), np.asarray(decode_token_mask(want, s)))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_inactive_retrieval_slots_plan_as_local_heads(backend):
    """A padded stacked cache's retrieval slot whose head is local in this layer (active False) plans exactly as
    that local head does (its band), in decode (reference and fused Triton selection) and in a prefill chunk;
    the active slots keep their selection, and visited_fraction averages over active slots only."""
    rng = np.random.default_rng(3)
    b, s = 2, 300
    slots = np.array([0, 1, 1, 1, 0, 0, 0, 0])  # retrieval slots at rows 1, 2, 3
    act = np.array([True, False, True])
    real = np.array([0, 1, 0, 1, 0, 0, 0, 0])  # the layer's own roles: rows 1 and 3
    sp = SparseConfig(roles=[real.tolist()], sinks=4, window=40, kv_block=16, top_p=0.8, keep_recent=16,
                      seqlen_threshold=0)
    q = jnp.asarray(rng.normal(size=(b, 3, 8)) * 1.5, jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, s, 3, 8)), jnp.float32)
    kv_len = jnp.asarray([s, 211])
    kw = dict(num_kv_heads=2, num_keys=s, dense=jnp.asarray(False), selection_backend=backend, interpret=True)
    sinks, window = planner.local_band(sp, CFG, jnp.asarray(False))
    want = planner.decode_step_plan(real, q[:, act], k[:, :, act], None, kv_len, sinks, window, sp, **kw)
    got = planner.decode_step_plan(slots, q, k, None, kv_len, sinks, window, sp, active=jnp.asarray(act), **kw)
    np.testing.assert_array_equal(np.asarray(decode_token_mask(got, s)), np.asarray(decode_token_mask(want, s)))
    np.testing.assert_allclose(np.asarray(planner.visited_fraction(got, (1, 2, 3), kv_len, jnp.asarray(act))),
                               np.asarray(planner.visited_fraction(want, (1, 3), kv_len)), rtol=1e-6)
    # a prefill chunk, retrieval heads dense and through a selection
    sel = jnp.asarray(rng.random((1, 3, 3, 9)) < 0.5)
    for sel_r in (None, sel):
        mk = lambda is_r, rows, sr, active=None: np.asarray(plan_to_dense_mask(planner.chunk_plan(
            is_r, rows, sr, jnp.asarray([90]), 40, 140, jnp.asarray([130]), jnp.int32(4), jnp.int32(24), q_block=16,
            kv_block=16, active=active), 40, 140))
        want = mk(real, (1, 3), None if sel_r is None else sel_r[:, act])
        np.testing.assert_array_equal(mk(slots, (1, 2, 3), sel_r, jnp.asarray(act)), want)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0), scale=0.3)


def _serve(params, toks, prompt, sp, steps):
    cache = init_cache(CFG, 1, toks.shape[1], sp, jnp.float32)
    lg, cache = prefill(params, cache, toks[:, :prompt], jnp.asarray([prompt]), None, cfg=CFG, sparse=sp, chunk=16)
    out = [lg]
    for i in range(prompt, prompt + steps):
        lg, cache = decode_step(params, cache, toks[:, i], None, cfg=CFG, sparse=sp)
        out.append(lg)
    return np.stack(out)[:, 0]


def test_short_calls_run_every_head_dense_in_apply_and_serving(params):
    """Below seqlen_threshold every head is dense — in lm.apply and in serving alike (the local KV heads' ring
    holds up to the threshold); at or past it the split is on, and the two paths still agree."""
    toks = jnp.asarray(np.random.default_rng(3).integers(0, CFG.vocab_size, (1, 48)), jnp.int32)
    full = np.asarray(forward(params, toks, CFG))[0]
    short = SparseConfig(roles=ROLES, sinks=2, window=5, kv_block=8, q_block=8, seqlen_threshold=64, top_p=1.0)
    assert_logits_close(np.asarray(apply(params, toks, CFG, mode="rtpurbo", sparse=short))[0], full)
    assert_logits_close(_serve(params, toks, 40, short, 7), full[39:47])
    on = dataclasses.replace(short, seqlen_threshold=20)
    ref = np.asarray(apply(params, toks[:, :40], CFG, mode="rtpurbo", sparse=on))[0]
    assert np.abs(ref - full[:40]).max() > 1e-2, "the split never switched on"
    assert_logits_close(_serve(params, toks, 40, on, 0)[0], ref[-1])


def test_serving_backends_are_honoured_or_refused():
    assert op_backends(None) == (None, None)
    assert op_backends("triton") == ("triton", "triton")
    assert op_backends({"prefill": "mosaic_gpu", "decode": "triton"}) == ("mosaic_gpu", "triton")
    with pytest.raises(ValueError, match="decode backend must be one of"):
        op_backends("mosaic_gpu")  # no Mosaic GPU decode op: refused, never swapped for another
    with pytest.raises(ValueError, match="prefill backend must be one of"):
        op_backends({"prefill": "cudnn"})
    with pytest.raises(ValueError, match="keys must be"):
        op_backends({"decoding": "triton"})
