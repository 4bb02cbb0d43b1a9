"""Stage-1 objective (RTPurbo eq. 6): forward KL from each retrieval head's exact attention to its indexer.

Trainable params are only the retrieval heads' maps, stacked over the R (layer, head) pairs:
`{"w_q": [R, H, I], "w_k": [R, H, I]}` (fp32). Teacher: the frozen model's post-RoPE q, k of that head,
softmax(q·k / sqrt(H)) over all causal keys (sinks and local tokens included: the full token-level
distribution, as the paper states). Student: softmax over the same keys of (q_pre W_q)·(k_pre W_k), pre-RoPE
inputs. Every query position enters the loss (position 0 has a one-key distribution and contributes 0).
The loss is summed over retrieval heads and averaged over batch and positions. Queries are processed in
chunks, each rematerialised in the backward pass: memory O(R · B · chunk · S), never S², forward and backward.

Axes: R retrieval heads, B batch, T = S sequence, H head_dim, I index_dim, C chunk, Sb key blocks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_plan import cdiv
from pallas_kernels.indexer_topp.reference import forced_blocks, topp_select
from rtpurbo_jax import indexer as ixr
from rtpurbo_jax.model import rope_inv_freq
from rtpurbo_jax.model_config import ModelConfig

_HI = jax.lax.Precision.HIGHEST
INITS = ("random", "pca", "rope_lowfreq")


def gather_heads(collected: dict, heads: np.ndarray, group: int) -> dict:
    """Per retrieval head [R, B, T, H] arrays (q, k, q_pre, k_pre) from `forward(..., collect=...)` output.

    heads: int [R, 2] (layer, query head). k arrays use the head's KV head (query head // group).
    """
    layer, head = jnp.asarray(heads[:, 0]), jnp.asarray(heads[:, 1])
    out = {}
    for name in ("q", "q_pre"):
        out[name] = collected[name][layer, :, :, head]
    for name in ("k", "k_pre"):
        out[name] = collected[name][layer, :, :, head // group]
    return out


def share_keys(tree: dict, groups: np.ndarray, reduce: bool) -> dict:
    """`tree` (indexer rows or their gradient, leaves [R, ...]) with w_k tied across each KV group (`key_groups`):
    reduce=True sums the group's rows (the gradient of one shared map) and gives the sum to every row, False copies
    the group's first row to all of them (the initial maps). Other leaves unchanged."""
    groups = jnp.asarray(groups)
    w = tree["w_k"]
    tied = jax.ops.segment_sum(w, groups, num_segments=w.shape[0])[groups] if reduce else w[groups]
    return {**tree, "w_k": tied}


def forced_token_mask(rows, s: int, kv_block: int, sinks: int, recent: int):
    """bool [C, S]: keys in the blocks top-p always keeps for query rows int [C] (`forced_blocks`, per token)."""
    blocks = forced_blocks(rows, rows, cdiv(s, kv_block), kv_block, sinks, recent)  # [C, Sb]
    return jnp.repeat(blocks, kv_block, axis=-1)[:, :s]


def _heads_last(x):
    """[R, B, T, H] (training's per-head layout) -> [B, T, R, H] (the indexer projections' layout)."""
    return jnp.moveaxis(x, 0, -2)


def _chunk_logits(chunk_start, chunk, heads_x, train, scale, local=None):
    """Teacher and student logits fp32 [R, B, C, S] for queries [chunk_start, chunk_start + chunk).

    local: (kv_block, sinks, recent) — with `w_local` / `b_local` in `train`, the student's local prior
    (q_pre · w_local + b_local, per row and head) is added to the logits of keys in the forced blocks."""
    q = jax.lax.dynamic_slice_in_dim(heads_x["q"], chunk_start, chunk, axis=2)
    qp = jax.lax.dynamic_slice_in_dim(heads_x["q_pre"], chunk_start, chunk, axis=2).astype(jnp.float32)
    t_logits = jnp.einsum("rbch,rbsh->rbcs", q, heads_x["k"], precision=_HI,
                          preferred_element_type=jnp.float32) * scale
    qi = ixr.project_queries(_heads_last(qp), train["w_q"])  # [B, C, R, I]
    ki = ixr.project_keys(_heads_last(heads_x["k_pre"].astype(jnp.float32)), train["w_k"])  # [B, S, R, I]
    s_logits = jnp.einsum("bcri,bsri->rbcs", qi, ki, precision=_HI)
    if local is not None:
        s_logits = add_local_prior(s_logits, qp, train, chunk_start + jnp.arange(chunk), *local)
    return t_logits, s_logits


def add_local_prior(s_logits, q_pre, train: dict, rows, kv_block: int, sinks: int, recent: int):
    """Student logits fp32 [R, B, C, S] plus the local prior (q_pre [R, B, C, H] · w_local + b_local) on the keys
    of each query row's forced blocks (rows int [C]: the rows' positions); unchanged without a prior."""
    if "w_local" not in train:
        return s_logits
    bias = jnp.moveaxis(ixr.local_prior(_heads_last(q_pre.astype(jnp.float32)), train), -1, 0)  # [R, B, C]
    mask = forced_token_mask(rows, s_logits.shape[-1], kv_block, sinks, recent)
    return s_logits + jnp.where(mask[None, None], bias[..., None], 0.0)


def _causal(chunk_start, chunk, s, t):
    rows = chunk_start + jnp.arange(chunk)
    return (jnp.arange(s)[None, :] <= rows[:, None]) & (rows < t)[:, None]


LOSS_LEVELS = ("token", "block")
LOSS_WEIGHTS = ("uniform", "longrange")


_NEG = -1e30  # finite masking: rows or blocks with no visible key stay NaN-free in value and gradient


def _row_kl(tl, sl, mask, level: str, kv_block: int):
    """Forward KL per query row fp32 [R, B, C] between teacher and student logits [R, B, C, S] under `mask`:
    over tokens, or over the `kv_block`-token block masses (the unit top-p selects)."""
    log_p = jax.nn.log_softmax(jnp.where(mask, tl, _NEG), axis=-1)
    log_q = jax.nn.log_softmax(jnp.where(mask, sl, _NEG), axis=-1)
    mask = jnp.broadcast_to(mask, log_p.shape)
    if level == "block":
        s = tl.shape[-1]
        sb = cdiv(s, kv_block)
        pad = [(0, 0)] * 3 + [(0, sb * kv_block - s)]
        blk = lambda x, v: jax.nn.logsumexp(jnp.pad(x, pad, constant_values=_NEG).reshape(*x.shape[:3], sb, kv_block),
                                            axis=-1, b=jnp.pad(v, pad).reshape(*x.shape[:3], sb, kv_block))
        log_p, log_q = blk(log_p, mask), blk(log_q, mask)
        mask = jnp.pad(mask, pad).reshape(*mask.shape[:3], sb, kv_block).any(-1)
        log_p, log_q = jnp.where(mask, log_p, 0.0), jnp.where(mask, log_q, 0.0)
    p = jnp.where(mask, jnp.exp(log_p), 0.0)
    return (p * jnp.where(mask, log_p - log_q, 0.0)).sum(-1)


def _longrange_mass(tl, mask, rows, sinks: int, recent: int):
    """fp32 [R, B, C]: the teacher's attention mass outside the keys top-p always keeps (the first `sinks`
    tokens and the last `recent` before each query) — the mass only the indexer can find."""
    p = jnp.where(mask, jax.nn.softmax(jnp.where(mask, tl, _NEG), axis=-1), 0.0)
    k = jnp.arange(tl.shape[-1])
    far = (k[None, :] >= sinks) & (rows[:, None] - k[None, :] >= recent)
    return jnp.where(far[None, None], p, 0.0).sum(-1)


def kl_loss(train: dict, heads_x: dict, chunk: int = 256, *, level: str = "token", weight: str = "uniform",
            kv_block: int = 64, sinks: int = 4, recent: int = 64):
    """Stage-1 loss, fp32 scalar: forward KL summed over retrieval heads, averaged over (batch, position).

    level "token": over the full token-level distribution (the paper's eq. 6); "block": over 64-token block
    masses, the quantity top-p ranks (the indexer need not order tokens inside a block).
    weight "uniform": every query row counts the same; "longrange": rows weighted by the teacher's mass outside
    the always-kept sink and recent keys (`_longrange_mass`), normalised by the total weight — the rows where
    the head retrieves from far away, which prose windows hold few of, dominate.
    """
    if level not in LOSS_LEVELS or weight not in LOSS_WEIGHTS:
        raise ValueError(f"loss level must be one of {LOSS_LEVELS} and weight one of {LOSS_WEIGHTS}; "
                         f"got {level!r}, {weight!r}")
    r, b, t, h = heads_x["q"].shape
    chunk = min(chunk, t)
    nc = cdiv(t, chunk)
    pad = nc * chunk - t
    padded = {k: jnp.pad(v, ((0, 0), (0, 0), (0, pad), (0, 0))) if k.startswith("q") else v for k, v in heads_x.items()}

    def one(ci):
        start = ci * chunk
        tl, sl = _chunk_logits(start, chunk, padded, train, h ** -0.5, (kv_block, sinks, recent))
        mask = _causal(start, chunk, t, t)[None, None]
        kl = _row_kl(tl, sl, mask, level, kv_block)  # [R, B, C]
        if weight == "uniform":
            return jnp.stack([kl.sum(), jnp.float32(0.0)])
        w = jax.lax.stop_gradient(_longrange_mass(tl, mask, start + jnp.arange(chunk), sinks, recent))
        return jnp.stack([(w * kl).sum(), w.sum()])

    # remat per chunk: the backward pass recomputes a chunk's logits instead of keeping every chunk's [R, B, C, S]
    # residuals (O(R · B · S²) — 769 GiB for 50 heads at 32K, which is what stopped training past 8K)
    tot = jax.lax.map(jax.checkpoint(one), jnp.arange(nc)).sum(0)
    if weight == "uniform":
        return tot[0] / (b * t)
    return r * tot[0] / jnp.maximum(tot[1], 1e-6)


def recall_metrics(train: dict, heads_x: dict, *, top_p: float = 0.9, kv_block: int = 64, probe: int = 128,
                   rows=None, sinks: int = 4, keep_recent: int = 64) -> dict:
    """Selection quality at probe rows (the last `probe` positions, or int `rows` [P]), with serving's policy
    (sink and recent blocks forced, their mass counted toward p):
    recall — teacher mass inside the indexer's top-p block set; selected_frac / oracle_frac — fraction of
    visible blocks the indexer / the teacher's own top-p set keep; top_hit — how often the teacher's heaviest
    non-forced block (the needle, at a retrieval row) is inside the indexer's set (the oracle's is by definition).
    """
    r, b, t, h = heads_x["q"].shape
    rows = jnp.arange(t - min(probe, t), t) if rows is None else jnp.asarray(rows, jnp.int32)
    sel_rows = {k: (v[:, :, rows] if k.startswith("q") else v) for k, v in heads_x.items()}
    tl, sl = _chunk_logits(0, rows.shape[0], sel_rows, train, h ** -0.5)
    sl = add_local_prior(sl, sel_rows["q_pre"], train, rows, kv_block, sinks, keep_recent)  # at the rows' positions
    mask = (jnp.arange(t)[None, :] <= rows[:, None])[None, None]
    p_t = jax.nn.softmax(jnp.where(mask, tl, -jnp.inf), axis=-1)
    p_s = jax.nn.softmax(jnp.where(mask, sl, -jnp.inf), axis=-1)
    sb = cdiv(t, kv_block)
    blk = lambda x: jnp.pad(x, [(0, 0)] * 3 + [(0, sb * kv_block - t)]).reshape(*x.shape[:3], sb, kv_block).sum(-1)
    bt, bs = blk(p_t), blk(p_s)
    vis = blk(mask.astype(jnp.float32) * jnp.ones_like(p_t)) > 0
    forced = forced_blocks(rows, rows, sb, kv_block, sinks, keep_recent)[None, None] & vis
    sel = topp_select(bs, vis, forced, top_p)
    oracle = topp_select(bt, vis, forced, top_p)
    top = jnp.argmax(jnp.where(vis & ~forced, bt, -1.0), axis=-1)
    has_far = (vis & ~forced).any(-1)
    hit = jnp.take_along_axis(sel, top[..., None], axis=-1)[..., 0]
    nvis = vis.sum(-1)
    return {"recall": (bt * sel).sum(-1).mean(), "selected_frac": (sel.sum(-1) / nvis).mean(),
            "oracle_frac": (oracle.sum(-1) / nvis).mean(),
            "top_hit": (hit & has_far).sum() / jnp.maximum(has_far.sum(), 1)}


def init_rows(kind: str, heads: np.ndarray, cfg: ModelConfig, index_dim: int, key, calib_x: dict | None = None,
                 local_prior: bool = True, groups: np.ndarray | None = None):
    """Initial {w_q, w_k: fp32 [R, H, I]} (+ the local prior w_local fp32 [R, H], b_local [R], zeros: no prior).

    random: normal(0, 1/sqrt(H)). rope_lowfreq: select the I dims of the I/2 lowest-frequency rotary pairs
    (half-split layout: pair j = dims j and j + H/2), scaled by H^-1/4 each side so the score equals the
    teacher's low-frequency part of q·k/sqrt(H) at distance 0. pca: per head, the top-I right singular vectors
    of the stacked pre-RoPE q and k rows of calibration text (`calib_x` from `gather_heads`), same scale.
    groups (int [R], `key_groups`; shared key maps): w_k is its group's first row everywhere, and with pca the
    basis is fitted per group (the q rows of every head in it and their shared k rows), w_q too, so that each
    head's query map starts in the basis of the key map it shares.
    """
    out = _init_maps(kind, heads, cfg, index_dim, key, calib_x, groups)
    if groups is not None:
        out = share_keys(out, groups, reduce=False)
    if local_prior:
        out.update(w_local=jnp.zeros((len(heads), cfg.head_dim), jnp.float32), b_local=jnp.zeros((len(heads),), jnp.float32))
    return out


def _init_maps(kind: str, heads: np.ndarray, cfg: ModelConfig, index_dim: int, key, calib_x: dict | None,
               groups: np.ndarray | None = None):
    r, h = len(heads), cfg.head_dim
    if kind not in INITS:
        raise ValueError(f"--init must be one of {INITS}, got {kind!r}")
    if index_dim > h:
        raise ValueError(f"index_dim {index_dim} exceeds head_dim {h}")
    if kind == "random":
        kq, kk = jax.random.split(key)
        return {"w_q": h ** -0.5 * jax.random.normal(kq, (r, h, index_dim)),
                "w_k": h ** -0.5 * jax.random.normal(kk, (r, h, index_dim))}
    if kind == "rope_lowfreq":
        if index_dim % 2:
            raise ValueError("rope_lowfreq init needs an even index_dim")
        order = np.argsort(rope_inv_freq(cfg.rope, h))[: index_dim // 2]  # lowest frequencies first
        dims = np.concatenate([order, order + h // 2])
        w = np.zeros((h, index_dim), np.float32)
        w[dims, np.arange(index_dim)] = h ** -0.25
        w = jnp.broadcast_to(jnp.asarray(w), (r, h, index_dim))
        return {"w_q": w, "w_k": jnp.array(w, copy=True)}  # distinct buffers (the step donates both)
    if calib_x is None:
        raise ValueError("pca init needs calibration activations")
    if groups is not None:  # one basis per key group: the top-I eigenvectors of the Gram matrix of every
        # member's q rows and the group's (shared) k rows — the right singular vectors of those rows stacked
        def gram(x):  # [R, H, H]
            x = x.reshape(r, -1, h).astype(jnp.float32)
            return jnp.einsum("rnh,rng->rhg", x, x, precision=_HI)

        g = jnp.asarray(groups)
        total = jax.ops.segment_sum(gram(calib_x["q_pre"]), g, num_segments=r)[g] + gram(calib_x["k_pre"])[g]
        w = jnp.linalg.eigh(total)[1][..., ::-1][..., :index_dim] * h ** -0.25
        return {"w_q": w, "w_k": jnp.array(w, copy=True)}
    rows = jnp.concatenate([calib_x["q_pre"], calib_x["k_pre"]], axis=2).reshape(r, -1, h).astype(jnp.float32)
    _, _, vt = jnp.linalg.svd(rows, full_matrices=False)
    w = jnp.swapaxes(vt[:, :index_dim], 1, 2) * h ** -0.25
    return {"w_q": w, "w_k": jnp.array(w, copy=True)}
