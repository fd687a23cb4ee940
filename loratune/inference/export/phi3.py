"""Phi-3, Phi-3.5 and Phi-4 (transformers' Phi3ForCausalLM) as llama.cpp's `phi3` computes them.

Query, key and value are one fused matrix and the feed-forward's gate and up projections another; llama.cpp's
`phi3` takes both as they are stored (queries, keys, values; gate, then up). The rotary embedding may cover only the
leading part of each head (`partial_rotary_factor`). LongRoPE (Phi-3/3.5's long-context models) divides each
frequency by a factor, one set for sequences within the original context and one beyond it, and scales the
rotation by an attention factor; llama.cpp stores both sets as tensors and picks by the context it is given.
"""

from __future__ import annotations

import math

import torch

from ...core.errors import UserError
from .rope import rope_parameters


def _original_context(config) -> int:
    rope = rope_parameters(config)
    return int(
        rope.get("original_max_position_embeddings")
        or getattr(config, "original_max_position_embeddings", None)
        or config.max_position_embeddings
    )


def check(config, shape) -> None:
    if shape.head_dim * shape.heads != config.hidden_size:
        raise UserError(f"model type 'phi3' with head_dim {shape.head_dim}: llama.cpp's phi3 takes the head size "
                        "as hidden_size / num_attention_heads, so GGUF export refuses it")  # fmt: skip
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UserError(f"model type 'phi3' with hidden_act {config.hidden_act!r}: llama.cpp's phi3 uses silu")
    rope = rope_parameters(config)
    if rope.get("rope_type") == "longrope":
        pairs = shape.rotary_dims // 2
        if len(rope["long_factor"]) != pairs or len(rope["short_factor"]) != pairs:
            raise UserError(f"model type 'phi3': its longrope long_factor and short_factor must have {pairs} "
                            "values (half the rotated dimensions)")  # fmt: skip


def _attention_factor(config, rope: dict) -> float:
    """LongRoPE's scale of the rotation, as transformers computes it."""
    if rope.get("attention_factor") is not None:
        return float(rope["attention_factor"])
    original = _original_context(config)
    factor = rope.get("factor") or config.max_position_embeddings / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def keys(writer, config, shape) -> None:
    writer.add_rope_scaling_orig_ctx_len(_original_context(config))
    writer.add_sliding_window(getattr(config, "sliding_window", None) or 0)  # older llama.cpp requires the key
    rope = rope_parameters(config)
    if rope.get("rope_type") == "longrope":
        writer.add_rope_scaling_attn_factors(_attention_factor(config, rope))


def rope_factors(config, shape) -> dict[str, torch.Tensor]:
    """LongRoPE's two sets of frequency divisors, which llama.cpp applies as transformers does."""
    rope = rope_parameters(config)
    if rope.get("rope_type") != "longrope":
        return {}
    return {
        "rope_factors_long.weight": torch.tensor(rope["long_factor"], dtype=torch.float32),
        "rope_factors_short.weight": torch.tensor(rope["short_factor"], dtype=torch.float32),
    }
