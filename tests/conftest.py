"""Shared fixtures: tiny random transformers models of each family, saved the ways users have them."""

from __future__ import annotations

import os

# 8 host devices for the sharding tests; LLVM at -O1 without its expensive passes: most tests here compile small
# programs once, and XLA's CPU backend at its default level spends more time optimising them than running them
# (measured on the scan and serving tests: -O1 roughly halved compile, the real-model tests no slower; dropping
# the expensive passes took 6-8% more off the scan tests, the real-model tests again no slower)
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=1 "
                      "--xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _parse_each_gguf_once():
    """gguf's reader takes ~6 s over SmolLM2's header (a 49K-entry vocabulary, one numpy view per string), and a
    load parses it twice (our tensors, then transformers' tokenizer; the parity test's transformers model twice
    more). The reader is read-only, so the tests keep one per file version (path, size, mtime): the same bytes
    parsed by the same code, ~6-18 s less per SmolLM2 load."""
    import gguf

    real, readers = gguf.GGUFReader, {}

    def reader(path, *args, **kwargs):
        st = os.stat(path)
        key = (os.path.abspath(path), st.st_size, st.st_mtime_ns, args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = real(path, *args, **kwargs)
        return readers[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", reader)
        yield


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop jit caches and compiled executables after each test module: the whole suite runs in one process on
    a 24 GiB CI machine, and 30-layer real-model programs from earlier modules are never needed again."""
    yield
    import gc

    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="module")
def xla_program_cache(tmp_path_factory):
    """XLA's persistent compilation cache for one module, in a fresh directory: modules that run whole training
    jobs several times (each run builds its own jitted closures, so the in-memory cache never hits) load the
    repeats instead of compiling them. Only there: for one-off programs, writing every executable costs more
    than it saves (a whole-suite run with the cache on was 12% slower)."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {n: getattr(jax.config, n) for n in names}
    for n, v in zip(names, (str(tmp_path_factory.mktemp("xla-cache")), 0.0, 0)):
        jax.config.update(n, v)
    cc.reset_cache()
    yield
    for n, v in old.items():
        jax.config.update(n, v)
    cc.reset_cache()


TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)


def tiny_hf_config(family: str):
    import transformers as tf

    if family == "llama":
        return tf.LlamaConfig(**TINY, rope_parameters=dict(
            rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=32), tie_word_embeddings=False)
    if family == "llama_linear":
        return tf.LlamaConfig(**TINY, rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0),
                              tie_word_embeddings=True)
    if family == "qwen2":
        return tf.Qwen2Config(**TINY, tie_word_embeddings=False)
    if family == "qwen3":
        return tf.Qwen3Config(**{**TINY, "num_key_value_heads": 1}, head_dim=32, tie_word_embeddings=True)
    if family == "mistral":
        return tf.MistralConfig(**TINY, sliding_window=16, tie_word_embeddings=False)
    raise KeyError(family)


def build_hf_model(family: str, seed: int = 0):
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tiny_hf_config(family)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # biases and norms are zero / one at init: randomise them so parity means something
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def save_hf(model, path: str, how: str) -> str:
    """how: safetensors | sharded | bin."""
    import torch

    os.makedirs(path, exist_ok=True)
    if how == "bin":
        model.config.save_pretrained(path)
        torch.save(model.state_dict(), os.path.join(path, "pytorch_model.bin"))
    elif how == "sharded":
        model.save_pretrained(path, max_shard_size="100KB")
    else:
        model.save_pretrained(path)
    return path


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()


def greedy_full(logits_fn, params, prompt, n: int) -> np.ndarray:
    """n greedy tokens int [B, n] of a full-sequence forward `logits_fn(params, tokens) -> [B, T, V]`, recomputed
    over the whole sequence each step. The sequence is kept at its final length (causal: the zeros after
    position i do not change the logits at i), so the forward compiles once, not once per token."""
    b, t = prompt.shape
    step = jax.jit(lambda p, s, i: jnp.argmax(logits_fn(p, s)[:, i], -1).astype(jnp.int32))
    seq = jnp.zeros((b, t + n), jnp.int32).at[:, :t].set(jnp.asarray(prompt, jnp.int32))
    for i in range(t, t + n):
        seq = seq.at[:, i].set(step(params, seq, i - 1))
    return np.asarray(seq[:, t:])


def assert_logits_close(ours, ref, rel=1e-4):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    err = np.abs(ours - ref).max()
    bound = rel * np.abs(ref).max()
    assert err <= bound, f"max |diff| {err:.3e} > {rel} x max|logit| = {bound:.3e}"


def assert_kernel_matches(out, lse, ref32, lse32, ref_lp=None, *, empty: bool = False):
    """A kernel's out / lse against the fp32 reference (ref32, lse32), with the tolerance derived from the
    reference run in the input dtype (ref_lp; None for fp32 inputs: 2e-5): error <= 2 x the low-precision
    reference's error + 1e-3. Rows that see no key: lse -inf in both, and (empty plans) zeros out."""
    tol = 2e-5 if ref_lp is None else 2 * float(jnp.abs(ref_lp.astype(jnp.float32) - ref32).max()) + 1e-3
    err = float(jnp.abs(out.astype(jnp.float32) - ref32).max())
    assert err <= tol, f"max error {err:.3e} > derived tolerance {tol:.3e}"
    fin = np.isfinite(np.asarray(lse32))
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), fin)
    np.testing.assert_allclose(np.asarray(lse)[fin], np.asarray(lse32)[fin], atol=20 * tol)
    if empty:
        assert np.all(np.asarray(out) == 0)


def check_op_against_reference(op, inputs, dtype, *, empty: bool = False, **kernel_kwargs):
    """Run op(q, k, v, backend=..., **kw) -> (out, lse) on fp32 `inputs` with the reference, then in `dtype`
    with `kernel_kwargs` (the backend under test), and `assert_kernel_matches` them. Returns the kernel's out."""
    ref32, lse32 = op(*map(jnp.asarray, inputs), backend="reference")
    args = [jnp.asarray(x, dtype) for x in inputs]
    out, lse = op(*args, **kernel_kwargs)
    ref_lp = None if dtype == jnp.float32 else op(*args, backend="reference")[0]
    assert_kernel_matches(out, lse, ref32, lse32, ref_lp, empty=empty)
    return out


@pytest.fixture(scope="session")
def smollm2_path():
    from convert.bundled import smollm2_gguf

    return smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path):
    """The bundled SmolLM2's tokenizer alone (which it holds: no separate header read)."""
    from convert.gguf_reader import gguf_tokenizer

    return gguf_tokenizer(smollm2_path, present=True)


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """(ModelConfig, jnp float32 params, tokenizer) of the bundled SmolLM2-135M-Instruct."""
    import jax.numpy as jnp

    from convert import load_source

    cfg, params, tok = load_source(smollm2_path, dtype="float32")
    return cfg, jax.tree.map(jnp.asarray, params), tok
