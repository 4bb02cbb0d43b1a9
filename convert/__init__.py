"""Hugging Face / GGUF checkpoints -> converted rtpurbo-jax checkpoints (CLI: `python -m convert`)."""

from convert.errors import ConversionError
from convert.load import load_source
from convert.pipeline import RoleOptions, convert

__all__ = ["ConversionError", "RoleOptions", "convert", "load_source"]
