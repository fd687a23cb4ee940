"""A transformers config's rotary embedding settings, in one form for every family and version."""

from __future__ import annotations


def rope_parameters(config, layer_type: str = "full_attention") -> dict:
    """The rotary settings of `layer_type`'s layers (Gemma 3 has one set per layer type, others one for all), with
    `rope_theta` always present."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return {**params, "rope_theta": theta}
