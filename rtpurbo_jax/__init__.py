"""rtpurbo-jax: RTPurbo sparse attention for JAX/Flax LLMs (retrieval heads, local heads, indexer top-p)."""

from rtpurbo_jax.model_config import LLAMA3_8B, QWEN3_8B, SMOLLM2_135M, ModelConfig, UnsupportedModelError, from_hf

__all__ = ["LLAMA3_8B", "QWEN3_8B", "SMOLLM2_135M", "ModelConfig", "UnsupportedModelError", "from_hf"]
