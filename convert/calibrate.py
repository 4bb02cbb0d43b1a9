"""Retrieval-head calibration (RTPurbo §1): score every query head, mark the top ones as retrieval heads.

Primary score (the paper's): a natural document with the same needle span near its start and at its end;
R_h = mean over the later needle's tokens of the attention mass they put on the earlier needle's tokens,
averaged over `calib_docs` documents. The first needle starts after a short text prefix (`prefix_len`) so the
attention sink (token 0) is not inside it.
Second score: long-range mass on ordinary text: for the `probe_queries` positions just before the later
needle, the attention mass outside the `sinks` + `window` a local head would keep (same forward pass). Agreement of the two (Spearman, top-k overlap) and
stability of the primary ranking across documents are reported.

Ranking is global over all layers' query heads by default (`per_layer=True` ranks within each layer).
Head count from a ratio: round(ratio × total), half up, at least 1. Granularity `kv` ranks GQA groups by
their best member's score and marks whole groups: round(count / G) groups, at least 1.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from rtpurbo_jax.model import forward
from rtpurbo_jax.model_config import ModelConfig

_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class CalibConfig:
    ratio: float | None = 0.15  # fraction of query heads to mark (ignored when num_retrieval is set)
    num_retrieval: int | None = None
    granularity: str = "query"
    per_layer: bool = False
    calib_len: int = 4096
    calib_docs: int = 4
    needle_len: int = 64
    prefix_len: int = 16
    seed: int = 0
    window: int = 512  # local window assumed by the long-range score
    sinks: int = 4
    probe_queries: int = 256

    def validate(self, cfg: ModelConfig) -> None:
        if self.num_retrieval is None and (self.ratio is None or not 0.0 < self.ratio <= 1.0):
            raise ValueError(f"--retrieval-ratio must be in (0, 1], got {self.ratio}")
        total = cfg.num_layers * cfg.num_heads
        if self.num_retrieval is not None and not 1 <= self.num_retrieval <= total:
            raise ValueError(f"--retrieval-heads must be in [1, {total}], got {self.num_retrieval}")
        if self.calib_len > cfg.max_position_embeddings:
            raise ValueError(f"--calib-len {self.calib_len} exceeds the model's {cfg.max_position_embeddings} positions")
        if self.calib_len < 2 * self.needle_len + self.prefix_len + 16:
            raise ValueError(f"--calib-len {self.calib_len} is too short for two {self.needle_len}-token needles")
        if self.calib_docs < 1:
            raise ValueError(f"--calib-docs must be >= 1, got {self.calib_docs}")
        if self.granularity not in ("query", "kv"):
            raise ValueError(f"--role-granularity must be query or kv, got {self.granularity!r}")
        if self.probe_queries < 1 or self.window + self.sinks >= self.calib_len - self.needle_len:
            raise ValueError("the long-range score needs calib_len > window + sinks and probe_queries >= 1")


def head_count(ratio: float, total: int) -> int:
    """Heads marked for a ratio: round half up, at least 1 (e.g. 0.15 × 270 = 40.5 -> 41)."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    return max(1, min(total, math.floor(ratio * total + 0.5)))


def attention_mass(q_rows, k, q_pos, key_sel):
    """fp32 [N, R]: each query row's softmax attention mass on the selected keys (causal).

    q_rows [R, N, H] post-RoPE, k [T, K, H] post-RoPE, q_pos int [R], key_sel bool [R, T].
    """
    r, n, h = q_rows.shape
    kh = k.shape[1]
    s = jnp.einsum("rkgh,tkh->kgrt", q_rows.reshape(r, kh, n // kh, h), k, precision=_HI,
                   preferred_element_type=jnp.float32).reshape(n, r, -1) * h ** -0.5
    causal = jnp.arange(k.shape[0])[None, :] <= q_pos[:, None]
    p = jax.nn.softmax(jnp.where(causal[None], s, -jnp.inf), axis=-1)
    return jnp.where(key_sel[None], p, 0.0).sum(-1)


@functools.partial(jax.jit, static_argnames=("cfg",))
def layer_masses(params, tokens, rows, key_sel, cfg: ModelConfig):
    """fp32 [P, L, N]: for P probes, the mean over query `rows` (int [P, R]) of the mass on `key_sel`
    (bool [P, R, T]) in every layer — one forward over `tokens` int [T] serves all probes."""
    _, col = forward(params, tokens[None], cfg, collect=("q", "k"), return_hidden=True)

    def one(qk):
        q, k = qk
        return jax.vmap(lambda r, ks: attention_mass(q[0, r], k[0], r, ks).mean(-1))(rows, key_sel)

    return jnp.moveaxis(jax.lax.map(one, (col["q"], col["k"])), 1, 0)


def needle_document(hay: np.ndarray, needle: np.ndarray, calib_len: int, prefix_len: int):
    """tokens int32 [calib_len] = hay prefix, needle, hay, needle; returns (tokens, first, second) spans."""
    nl = len(needle)
    body = calib_len - prefix_len - 2 * nl
    tokens = np.concatenate([hay[:prefix_len], needle, hay[prefix_len: prefix_len + body], needle]).astype(np.int32)
    return tokens, (prefix_len, prefix_len + nl), (calib_len - nl, calib_len)


def document_scores(params, cfg: ModelConfig, tokens: np.ndarray, first, second, window: int, sinks: int,
                    probe: int) -> tuple[np.ndarray, np.ndarray]:
    """(needle score R_h, long-range score), each fp32 [L, N], from one forward over a needle document.

    Needle: rows = the later needle, keys = the earlier needle. Long-range: rows = the `probe` ordinary-text
    queries just before the later needle (R = needle length per probe group), keys = everything outside the
    sinks and the window. Probes are padded to the same row count by repeating rows.
    """
    t = len(tokens)
    nl = second[1] - second[0]
    needle_rows = np.arange(*second)
    lr_rows = np.arange(max(window + sinks, second[0] - probe), second[0])
    lr_rows = np.resize(lr_rows, (int(np.ceil(len(lr_rows) / nl)), nl))
    keys = np.arange(t)
    rows = np.concatenate([needle_rows[None], lr_rows])
    key_sel = np.zeros(rows.shape + (t,), bool)
    key_sel[0, :, first[0]:first[1]] = True
    key_sel[1:] = (keys >= sinks) & (rows[1:, :, None] - keys >= window)
    m = np.asarray(layer_masses(params, jnp.asarray(tokens), jnp.asarray(rows), jnp.asarray(key_sel), cfg))
    return m[0], m[1:].mean(0)


def select_roles(scores: np.ndarray, count: int, granularity: str, group: int, per_layer: bool) -> np.ndarray:
    """bool [L, N]: the top `count` heads (see the module doc for kv groups and per-layer ranking)."""
    L, N = scores.shape
    unit = scores.reshape(L, N // group, group).max(-1) if granularity == "kv" else scores
    k = max(1, math.floor(count / group + 0.5)) if granularity == "kv" else count
    sel = np.zeros(unit.shape, bool)
    if per_layer:
        per = max(1, math.floor(k / L + 0.5))
        idx = np.argsort(-unit, axis=1, kind="stable")[:, :per]
        np.put_along_axis(sel, idx, True, axis=1)
    else:
        flat = np.argsort(-unit.ravel(), kind="stable")[:k]
        sel.ravel()[flat] = True
    return np.repeat(sel, group, axis=1) if granularity == "kv" else sel


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a.ravel())).astype(np.float64)
    rb = np.argsort(np.argsort(b.ravel())).astype(np.float64)
    return float(np.corrcoef(ra, rb)[0, 1])


def topk_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """|top-k(a) ∩ top-k(b)| / k."""
    ta = set(np.argsort(-a.ravel(), kind="stable")[:k].tolist())
    tb = set(np.argsort(-b.ravel(), kind="stable")[:k].tolist())
    return len(ta & tb) / k


def make_documents(calib: CalibConfig, tokenizer=None, vocab_size: int | None = None):
    """Deterministic calibration documents: list of (needle_doc, first, second) per doc.

    With a tokenizer: KJV text from the calibration split (needle = another calibration-split span). Without
    one (tiny test models): uniform random tokens.
    """
    from convert.corpus import text_tokens

    docs = []
    for d in range(calib.calib_docs):
        seed = calib.seed * 100_003 + d
        if tokenizer is not None:
            hay = text_tokens(tokenizer, calib.calib_len, seed, "calib")
            needle = text_tokens(tokenizer, calib.needle_len, seed + 7919, "calib")
        else:
            rng = np.random.default_rng(seed)
            hay = rng.integers(0, vocab_size, calib.calib_len).astype(np.int32)
            needle = rng.integers(0, vocab_size, calib.needle_len).astype(np.int32)
        tokens, first, second = needle_document(hay, needle, calib.calib_len, calib.prefix_len)
        docs.append((tokens, first, second))
    return docs


def calibrate_model(params, cfg: ModelConfig, calib: CalibConfig, tokenizer=None, progress=None) -> dict:
    """Score, rank and select retrieval heads. Returns a JSON-able report with `roles` ([L][N] 0/1)."""
    calib.validate(cfg)
    docs = make_documents(calib, tokenizer, cfg.vocab_size)
    needle, longrange = [], []
    for i, (tokens, first, second) in enumerate(docs):
        n, lr = document_scores(params, cfg, tokens, first, second, calib.window, calib.sinks, calib.probe_queries)
        needle.append(n)
        longrange.append(lr)
        if progress:
            progress(i + 1, len(docs))
    needle, longrange = np.stack(needle), np.stack(longrange)
    mean, lr = needle.mean(0), longrange.mean(0)
    total = cfg.num_layers * cfg.num_heads
    count = calib.num_retrieval or head_count(calib.ratio, total)
    roles = select_roles(mean, count, calib.granularity, cfg.group_size, calib.per_layer)
    k = int(roles.sum())
    pairs = [(a, b) for a in range(len(docs)) for b in range(a + 1, len(docs))]
    return {
        "method": "needle repeated at start and end; R_h = mean mass of later needle tokens on the earlier needle",
        "calib": dataclasses.asdict(calib), "ranking": "per_layer" if calib.per_layer else "global",
        "num_retrieval": k, "total_heads": total, "roles": roles.astype(int).tolist(),
        "needle_score": mean.tolist(), "needle_score_per_doc": needle.tolist(), "longrange_score": lr.tolist(),
        "agreement": {"spearman": spearman(mean, lr), "topk_overlap": topk_overlap(mean, lr, k)},
        "stability": {
            "pairwise_topk_overlap": float(np.mean([topk_overlap(needle[a], needle[b], k) for a, b in pairs]))
            if pairs else None,
            "pairwise_spearman": float(np.mean([spearman(needle[a], needle[b]) for a, b in pairs])) if pairs else None,
            "per_doc_topk_overlap_with_mean": [topk_overlap(n, mean, k) for n in needle],
        },
    }


def write_report(report: dict, out_dir: str, stem: str = "calibration") -> tuple[str, str]:
    """calibration.json (every score) and calibration.png (layers × heads heat maps, retrieval heads boxed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    json_path, png_path = os.path.join(out_dir, stem + ".json"), os.path.join(out_dir, stem + ".png")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1)
    roles = np.asarray(report["roles"])
    fig, axes = plt.subplots(1, 2, figsize=(10, max(3, roles.shape[0] * 0.22 + 1.5)))
    for ax, key, title in ((axes[0], "needle_score", "needle retrieval score R_h"),
                           (axes[1], "longrange_score", "mass outside sinks + window")):
        im = ax.imshow(np.asarray(report[key]), aspect="auto", cmap="viridis")
        ys, xs = np.nonzero(roles)
        ax.scatter(xs, ys, marker="s", s=30, facecolors="none", edgecolors="red", linewidths=1.0)
        ax.set_xlabel("query head")
        ax.set_ylabel("layer")
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"{report['num_retrieval']}/{report['total_heads']} retrieval heads (red), "
                 f"{report['ranking']} ranking; Spearman(needle, long-range) = {report['agreement']['spearman']:.2f}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return json_path, png_path
