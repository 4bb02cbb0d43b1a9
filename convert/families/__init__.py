"""Converter name maps, one module per checkpoint layout."""

from convert.families import llama

_BY_MODEL_TYPE = {"llama": llama, "mistral": llama, "qwen2": llama, "qwen3": llama}


def for_model_type(model_type: str):
    """The family module whose `to_params(tensors, cfg, dtype, source)` maps this model type's tensors."""
    return _BY_MODEL_TYPE[model_type]
