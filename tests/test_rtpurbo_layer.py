"""RTPurbo attention and the model in mode="rtpurbo": reductions to full attention, roles, padding, configs."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_plan import plan_to_dense_mask
from rtpurbo_jax.lm import CausalLM, apply
from rtpurbo_jax.model import forward
from rtpurbo_jax.model_config import SMOLLM2_135M
from rtpurbo_jax.params import init_params
from rtpurbo_jax.attention import AttentionCall, sequence_attention
from rtpurbo_jax.indexer import init_indexer
from rtpurbo_jax.sparse_config import SparseConfig, roles_to_kv_granularity
from tests import np_reference as npr

CFG = dataclasses.replace(SMOLLM2_135M, num_layers=2, vocab_size=97, hidden_size=48, intermediate_size=64,
                          num_heads=6, num_kv_heads=2, head_dim=8)
ROLES = np.array([[0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1]])


@pytest.fixture(scope="module")
def model():
    params = init_params(CFG, jax.random.key(0), scale=0.4)
    indexer = init_indexer(CFG, 4, jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(2), (2, 141), 0, CFG.vocab_size)  # not a multiple of any block
    return params, indexer, tokens, forward(params, tokens, CFG)


def sparse(**kw):
    base = dict(roles=ROLES, sinks=4, window=24, kv_block=16, q_block=32, index_dim=4, seqlen_threshold=0)
    return SparseConfig(**{**base, **kw})


@pytest.mark.parametrize("prefill_mode", ["dense", "indexer"])
def test_top_p_1_and_covering_window_equals_full(model, prefill_mode):
    params, indexer, tokens, full = model
    out = apply(params, tokens, CFG, mode="rtpurbo", sparse=sparse(window=141, top_p=1.0, prefill_mode=prefill_mode),
                indexer=indexer)
    np.testing.assert_allclose(out, full, atol=1e-4, rtol=1e-4)


def test_all_retrieval_top_p_1_equals_full_with_tiny_window(model):
    params, indexer, tokens, full = model
    sp = sparse(roles=np.ones((2, 6), int), window=3, top_p=1.0, prefill_mode="indexer")
    np.testing.assert_allclose(apply(params, tokens, CFG, mode="rtpurbo", sparse=sp, indexer=indexer), full,
                               atol=1e-4, rtol=1e-4)


def test_short_sequences_run_full_attention(model):
    params, indexer, tokens, full = model
    sp = sparse(seqlen_threshold=142, top_p=0.3, prefill_mode="indexer")  # 141 < threshold
    np.testing.assert_allclose(apply(params, tokens, CFG, mode="rtpurbo", sparse=sp, indexer=indexer), full,
                               atol=1e-4, rtol=1e-4)
    sparse_out = apply(params, tokens, CFG, mode="rtpurbo", sparse=dataclasses.replace(sp, seqlen_threshold=141),
                       indexer=indexer)
    assert np.abs(np.asarray(sparse_out) - np.asarray(full)).max() > 1e-2, "threshold did not switch sparsity on"


def test_layer_plan_gives_each_head_its_role():
    """The planner's merged plan of a whole sequence: local heads get the sink + window band, retrieval heads
    (dense prefill) every causal key."""
    from rtpurbo_jax.planner import chunk_plan, local_band

    t = 100
    sinks, window = local_band(sparse(), CFG, jnp.asarray(False))
    plan = chunk_plan(jnp.asarray(ROLES[0], bool), None, None, jnp.zeros((1,), jnp.int32), t, t, jnp.asarray([t]),
                      sinks, window, q_block=32, kv_block=16)
    dense = np.asarray(plan_to_dense_mask(plan, t, t))[0]
    np.testing.assert_array_equal(dense[0], npr.band_mask(t, t, 4, 24, 0, 1)[0])  # local head
    np.testing.assert_array_equal(dense[1], np.tril(np.ones((t, t), bool)))  # retrieval head, dense prefill


def test_padding_rows_match_unpadded_runs(model):
    params, indexer, tokens, _ = model
    sp = sparse(top_p=0.6, prefill_mode="indexer")
    lengths = jnp.asarray([141, 90])
    padded = tokens.at[1, 90:].set(5)
    out = apply(params, padded, CFG, mode="rtpurbo", sparse=sp, indexer=indexer, lengths=lengths)
    alone = apply(params, tokens[1:, :90], CFG, mode="rtpurbo", sparse=sp, indexer=indexer)
    np.testing.assert_allclose(out[1, :90], alone[0], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(out[0], apply(params, tokens[:1], CFG, mode="rtpurbo", sparse=sp, indexer=indexer)[0],
                               atol=1e-4, rtol=1e-4)


def test_nnx_shell_matches_pure_apply(model):
    params, indexer, tokens, _ = model
    sp = sparse(top_p=0.5, prefill_mode="indexer")
    lm = CausalLM(CFG, params, sp, indexer)
    np.testing.assert_array_equal(lm(tokens, mode="rtpurbo"),
                                  apply(params, tokens, CFG, mode="rtpurbo", sparse=sp, indexer=indexer))


def test_kv_granularity():
    kv_roles = roles_to_kv_granularity(ROLES, 2)
    np.testing.assert_array_equal(kv_roles, [[1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]])
    sparse(roles=kv_roles, granularity="kv").check_model(2, 6, 2)
    with pytest.raises(ValueError, match="GQA group"):
        sparse(granularity="kv").check_model(2, 6, 2)
    with pytest.raises(ValueError, match="2 layers x 6"):
        sparse(roles=np.ones((3, 6), int)).check_model(2, 6, 2)


def test_config_round_trips_and_validation():
    sp = sparse(top_p=0.8, max_blocks=7)
    assert SparseConfig.from_dict(sp.to_dict()) == sp
    hw = sp.to_headwise()
    assert hw["sink_token_num"] == 4 and hw["swa_token_num"] == 24 and hw["1"] == [0, 0, 0, 0, 1, 1]
    back = SparseConfig.from_headwise(hw, kv_block=16, q_block=32, index_dim=4, top_p=0.8, max_blocks=7)
    assert back == sp
    for bad in (dict(top_p=0.0), dict(top_p=1.01), dict(granularity="group"), dict(prefill_mode="sparse"),
                dict(roles=[[0, 2]]), dict(window=0)):
        with pytest.raises(ValueError):
            sparse(**bad)
    with pytest.raises(ValueError, match="unknown SparseConfig fields"):
        SparseConfig.from_dict({**sp.to_dict(), "windw": 3})


def test_mode_errors(model):
    params, _, tokens, _ = model
    with pytest.raises(ValueError, match="mode must be"):
        apply(params, tokens, CFG, mode="sparse")
    with pytest.raises(ValueError, match="needs indexer weights"):
        apply(params, tokens, CFG, mode="rtpurbo", sparse=sparse(prefill_mode="indexer"))


@pytest.mark.slow
def test_smollm2_rtpurbo_at_2k(smollm2):
    """The real model in rtpurbo mode at 2K tokens (4x the window) on CPU; positions inside the window equal full
    attention."""
    cfg, params, tok = smollm2
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(100, 40000, size=(1, 2048)))
    roles = np.zeros((cfg.num_layers, cfg.num_heads), int)
    roles[rng.random(roles.shape) < 0.15] = 1
    sp = SparseConfig(roles=roles, window=512, seqlen_threshold=0)
    head, tail = jax.jit(lambda p, t: (lambda o: (o[:, :512], o[:, -8:]))(apply(p, t, cfg, mode="rtpurbo",
                                                                                   sparse=sp)))(params, tokens)
    assert np.isfinite(np.asarray(tail)).all()
    ref = forward(params, tokens[:, :512], cfg)
    np.testing.assert_allclose(head[0], ref[0], atol=1e-3 * np.abs(np.asarray(ref)).max())


@pytest.mark.parametrize("backend", ["mosaic_gpu", "triton"])
def test_layer_on_a_pallas_backend_matches_the_reference(backend):
    """sequence_attention with a Pallas prefill backend runs the merged plan (local bands + indexer top-p)
    through the kernel (interpret mode here) and agrees with the jnp path up to bf16 error."""

    b, t, n, kh, h = 1, 200, 4, 2, 64
    keys = jax.random.split(jax.random.key(7), 5)
    q, qp = (jax.random.normal(kk, (b, t, n, h), jnp.bfloat16) for kk in keys[:2])
    k, kp, v = (jax.random.normal(kk, (b, t, kh, h), jnp.bfloat16) for kk in keys[2:])
    qkv = dict(q=q, k=k, v=v, q_pre=qp, k_pre=kp)
    cfg = SparseConfig(roles=np.array([[1, 0, 0, 1]]), sinks=4, window=70, kv_block=64, q_block=128, index_dim=4,
                       seqlen_threshold=0, prefill_mode="indexer", top_p=0.8)
    mcfg = dataclasses.replace(CFG, num_layers=1, num_heads=n, num_kv_heads=kh, head_dim=h)
    w = jax.tree.map(lambda x: x[0], init_indexer(mcfg, 4, jax.random.key(8)))
    call = AttentionCall(tile=128, dense_retrieval=False)
    run = lambda qkv, call: sequence_attention(qkv, jnp.asarray([True, False, False, True]), w, cfg, mcfg, call,
                                               jnp.asarray([190]))
    ref = run(qkv, call).astype(jnp.float32)
    ref32 = run(dict(qkv, q=q.astype(jnp.float32), k=k.astype(jnp.float32), v=v.astype(jnp.float32)), call)
    out = run(qkv, dataclasses.replace(call, prefill_backend=backend, interpret=True)).astype(jnp.float32)
    tol = 2 * float(jnp.abs(ref - ref32).max()) + 1e-3
    assert float(jnp.abs(out - ref32).max()) <= tol


def test_gradients_flow_through_sparse_mode(model):
    """Stage 2 trains the backbone through mode="rtpurbo" (the layer serving runs): with nothing dropped the
    gradient equals full attention's; with indexer top-p it is finite, differs, and matches a finite difference
    along a random direction (the selection is piecewise constant, so a small step keeps it)."""
    params, indexer, tokens, _ = model
    toks = tokens[:1, :64]
    loss = lambda p, **kw: jnp.mean(jax.nn.logsumexp(apply(p, toks, CFG, **kw), -1))
    g_full = jax.jit(jax.grad(loss))(params)  # jitted: eager grads dispatch (and compile) op by op
    keep_all = sparse(window=64, top_p=1.0, prefill_mode="indexer")
    g_same = jax.jit(jax.grad(lambda p: loss(p, mode="rtpurbo", sparse=keep_all, indexer=indexer)))(params)
    for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_same)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
    sp = sparse(window=8, top_p=0.5, prefill_mode="indexer", kv_block=8, q_block=8, keep_recent=8)
    f = jax.jit(lambda p: loss(p, mode="rtpurbo", sparse=sp, indexer=indexer))
    g = jax.grad(f)(params)
    dense_ret = dataclasses.replace(sp, prefill_mode="dense")
    g_dense_ret = jax.jit(jax.grad(lambda p: loss(p, mode="rtpurbo", sparse=dense_ret, indexer=indexer)))(params)
    wq = np.asarray(g["layers"]["wq"])
    assert np.isfinite(wq).all() and np.abs(wq - np.asarray(g_dense_ret["layers"]["wq"])).max() > 1e-5, \
        "the top-p selection had no effect on the gradient"
    d = jax.tree.map(lambda x: jax.random.normal(jax.random.key(5), x.shape, x.dtype), params)
    eps = 1e-4  # small enough that the step keeps every selection (larger steps cross block boundaries)
    fd = (f(jax.tree.map(lambda p, u: p + eps * u, params, d)) - f(jax.tree.map(lambda p, u: p - eps * u, params, d))) / (2 * eps)
    an = sum(jnp.vdot(a, u) for a, u in zip(jax.tree.leaves(g), jax.tree.leaves(d)))
    np.testing.assert_allclose(float(an), float(fd), rtol=1e-2)


def test_training_backend_matches_reference_through_the_model(model):
    """`attn_backend="xla"` (what stage 2 differentiates) gives the reference's logits and gradients through
    the whole model in sparse mode: indexer top-p plans per tile, local bands, right padding."""
    params, indexer, tokens, _ = model
    tokens = tokens[:, :75]  # not a multiple of any block; the second row right-padded
    sp = sparse(window=8, top_p=0.5, prefill_mode="indexer", kv_block=8, q_block=8, keep_recent=8)
    lengths = jnp.asarray([75, 50])

    def run(backend):
        f = lambda p: apply(p, tokens, CFG, mode="rtpurbo", sparse=sp, indexer=indexer, lengths=lengths,
                            attn_backend=backend)
        valid = (jnp.arange(tokens.shape[1])[None] < lengths[:, None])[..., None]
        loss = lambda p: jnp.sum(jnp.where(valid, jax.nn.log_softmax(f(p)), 0.0)[..., :7])
        return jax.jit(f)(params), jax.jit(jax.grad(loss))(params)

    (lx, gx), (lr, gr) = run("xla"), run("reference")
    valid = np.arange(tokens.shape[1])[None] < np.asarray(lengths)[:, None]
    np.testing.assert_allclose(np.asarray(lx)[valid], np.asarray(lr)[valid], atol=1e-4)  # fp32 sum order
    for a, b in zip(jax.tree.leaves(gx), jax.tree.leaves(gr)):
        err, scale = float(jnp.abs(a - b).max()), float(jnp.abs(b).max())
        assert err <= 1e-4 * scale + 1e-7, (err, scale)


def test_full_mode_honours_the_backend(model):
    """mode="full" runs through the planner and the op like sparse mode: the default ("reference") equals the
    reference op's causal attention called directly (its own band plan, not the planner's); "xla" (and None: the
    device's kernel) give the same logits with right padding; an unknown name is refused, not swapped."""
    from pallas_kernels.sparse_attention.reference import attention

    params, _, tokens, full = model
    tokens = tokens[:, :75]
    lengths = jnp.asarray([75, 50])
    direct = forward(params, tokens, CFG, lengths=lengths,
                     attn_fn=lambda qkv, _: attention(qkv["q"], qkv["k"], qkv["v"], q_offset=0, lengths=lengths))
    valid = np.arange(75)[None] < np.asarray(lengths)[:, None]
    ref = apply(params, tokens, CFG, lengths=lengths)
    np.testing.assert_allclose(np.asarray(ref)[valid], np.asarray(direct)[valid], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(full)[:, :75], np.asarray(apply(params, tokens, CFG)), atol=1e-5, rtol=1e-5)
    for backend in ("xla", None):
        out = jax.jit(lambda p, t: apply(p, t, CFG, lengths=lengths, attn_backend=backend))(params, tokens)
        np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(ref)[valid], atol=1e-4)  # fp32 sum order
    with pytest.raises(ValueError, match="backend must be one of"):
        apply(params, tokens, CFG, attn_backend="cudnn")


@pytest.mark.parametrize("mesh_shape", ["2,4", "4,2"])
def test_full_attention_per_shard_of_a_mesh(model, mesh_shape):
    """full_attention(mesh=...) runs the op per shard (`shard_map`: sequences over "data", heads with their KV heads
    over "model" where the sizes divide — (2, 4) splits the batch only, (4, 2) the heads only), here the Triton
    kernel in interpret mode, and gives the unsharded logits."""
    from rtpurbo_jax.model import full_attention
    from train.trainer import make_mesh

    params, _, tokens, _ = model
    tokens = tokens[:, :75]
    lengths = jnp.asarray([75, 50])
    mesh = make_mesh(mesh_shape)
    want = apply(params, tokens, CFG, lengths=lengths)
    got = jax.jit(lambda p, t: forward(p, t, CFG, lengths=lengths, attn_fn=full_attention(
        CFG, lengths, backend="triton", interpret=True, mesh=mesh)))(params, tokens)
    valid = np.arange(75)[None] < np.asarray(lengths)[:, None]
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=1e-4)


def test_sparse_mode_per_shard_of_a_mesh(model):
    """mode="rtpurbo" with mesh=: the attention runs per shard (sequences over "data"; heads stay whole, since a
    layer's retrieval heads index all N) — the Triton kernel in interpret mode gives the unsharded logits, and the
    xla backend the unsharded loss and gradients (stage 2 differentiates it), through a shard_map."""
    from rtpurbo_jax.attention import retrieval_rows
    from rtpurbo_jax.lm import rtpurbo_attn_fn
    from train.trainer import make_mesh

    params, indexer, tokens, _ = model
    tokens, lengths = tokens[:, :75], jnp.asarray([75, 50])
    valid = np.arange(75)[None] < np.asarray(lengths)[:, None]
    sp = sparse(window=8, top_p=0.5, prefill_mode="indexer", kv_block=8, q_block=8, keep_recent=8)
    mesh = make_mesh("2,4")
    data = (jnp.asarray(sp.roles_array), indexer, jnp.asarray(retrieval_rows(sp.roles_array)))
    want = apply(params, tokens, CFG, mode="rtpurbo", sparse=sp, indexer=indexer, lengths=lengths)
    got = jax.jit(lambda p, t: forward(p, t, CFG, lengths=lengths, layer_data=data, attn_fn=rtpurbo_attn_fn(
        CFG, sp, lengths, backend="triton", interpret=True, mesh=mesh)))(params, tokens)
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=1e-4)

    def loss(p, m):
        out = apply(p, tokens, CFG, mode="rtpurbo", sparse=sp, indexer=indexer, lengths=lengths, attn_backend="xla",
                    mesh=m)
        return (jnp.where(jnp.asarray(valid)[..., None], jax.nn.log_softmax(out), 0.0) ** 2).mean()

    assert "shard_map" in str(jax.make_jaxpr(lambda p: loss(p, mesh))(params)), "attention not run per shard"
    assert "shard_map" not in str(jax.make_jaxpr(lambda p: loss(p, None))(params))
    (l1, g1), (l8, g8) = (jax.jit(jax.value_and_grad(lambda p: loss(p, m)))(params) for m in (None, mesh))
    np.testing.assert_allclose(float(l8), float(l1), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(g1)):  # fp32 sums in another order (per shard, then across)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4 * float(jnp.abs(b).max()), rtol=1e-4)


def test_selection_for_retrieval_rows_only_matches_all_heads(model):
    """`lm.apply` selects for each layer's retrieval heads only (`retrieval_rows`: padded by repetition); the
    logits equal selecting for all N heads and keeping the retrieval heads' (layer_data without r_heads)."""
    from rtpurbo_jax.attention import retrieval_rows
    from rtpurbo_jax.lm import rtpurbo_attn_fn

    params, indexer, tokens, _ = model
    sp = sparse(window=8, top_p=0.5, prefill_mode="indexer", kv_block=8, q_block=8, keep_recent=8)
    rows = retrieval_rows(sp.roles_array)
    np.testing.assert_array_equal(rows, [[1, 1], [4, 5]])
    roles = jnp.asarray(sp.roles_array)
    run = lambda data: forward(params, tokens, CFG, layer_data=data, attn_fn=rtpurbo_attn_fn(CFG, sp))
    np.testing.assert_allclose(np.asarray(run((roles, indexer, jnp.asarray(rows)))),
                               np.asarray(run((roles, indexer))), atol=1e-5)
    np.testing.assert_allclose(np.asarray(apply(params, tokens, CFG, mode="rtpurbo", sparse=sp, indexer=indexer)),
                               np.asarray(run((roles, indexer))), atol=1e-5)
