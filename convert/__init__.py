"""Hugging Face / GGUF checkpoints -> converted rtpurbo-jax checkpoints (CLI: `python -m convert`)."""

from convert.errors import ConversionError
from convert.load import load_source

__all__ = ["ConversionError", "load_source"]
