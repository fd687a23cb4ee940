"""The model families GGUF export supports: their llama.cpp architecture, hyperparameters and tensor names.

Llama-family checkpoints store the query and key rows of each head as two halves (the rotary pairs are i and
i + d/2); llama.cpp's `llama` architecture expects each pair side by side (2i, 2i + 1), so those rows are
reordered. Qwen2, Qwen3, Gemma and Phi-3 use the halved layout in llama.cpp too and are written as they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...core.errors import UserError
from . import gemma, phi3
from .rope import rope_parameters

SUPPORTED = (
    "Llama (Llama 2/3, SmolLM, SmolLM2, Mistral, Mistral Nemo), Qwen2/Qwen2.5/Qwen3, Gemma 2, Gemma 3 (text) and "
    "Phi-3/Phi-3.5/Phi-4"
)


@dataclass(frozen=True)
class Family:
    arch: str  # llama.cpp's architecture name (gguf.MODEL_ARCH_NAMES)
    pairs_rotary_rows: bool  # reorder query/key rows from halves to adjacent pairs
    rope_types: tuple[str, ...] = ("default", "linear", "llama3")
    norm_offset: float = 0.0  # Gemma's RMSNorm scales by 1 + weight, llama.cpp's by the weight it is given
    window_caps_context: bool = False  # llama.cpp attends to the whole context: a sliding window bounds the context
    check: Callable | None = None  # (config, shape): refuses settings llama.cpp would compute otherwise
    keys: Callable | None = None  # (writer, config, shape): the family's own hyperparameters
    tensors: Callable | None = None  # (config, shape) -> tensors llama.cpp needs that the checkpoint does not store


FAMILIES = {
    "llama": Family("llama", True),
    "mistral": Family("llama", True, window_caps_context=True),
    "qwen2": Family("qwen2", False),
    "qwen3": Family("qwen3", False),
    "gemma2": Family("gemma2", False, ("default",), 1.0, check=gemma.check_gemma2, keys=gemma.gemma2_keys),
    "gemma3_text": Family(
        "gemma3", False, ("default", "linear"), 1.0, check=gemma.check_gemma3, keys=gemma.gemma3_keys
    ),
    "phi3": Family(
        "phi3",
        False,
        ("default", "longrope"),
        window_caps_context=True,
        check=phi3.check,
        keys=phi3.keys,
        tensors=phi3.rope_factors,
    ),
}


@dataclass(frozen=True)
class Shape:
    """What the tensor conversion needs to know of a model."""

    family: Family
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool  # the output layer is the embedding (no output.weight is written)
    rotary_dims: int = 0  # the leading dimensions of each head that are rotated (Phi-3's partial rotary)


def model_shape(config) -> Shape:
    """The family and shape of a transformers config; refuses anything GGUF export does not support."""
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise UserError(f"model type {config.model_type!r}: GGUF export supports {SUPPORTED}")
    rope = rope_parameters(config)
    if rope.get("rope_type", "default") not in family.rope_types:
        raise UserError(
            f"model type {config.model_type!r} with rope_type {rope['rope_type']!r}: GGUF export supports the "
            f"rotary embeddings {', '.join(family.rope_types)} for it"
        )
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    shape = Shape(
        family,
        config.num_hidden_layers,
        heads,
        getattr(config, "num_key_value_heads", None) or heads,
        head_dim,
        bool(getattr(config, "tie_word_embeddings", False)),
        int(head_dim * rope.get("partial_rotary_factor", 1.0)),
    )
    if family.check is not None:
        family.check(config, shape)
    return shape


def context_length(config, shape: Shape) -> int:
    """The context llama.cpp computes like transformers: all of it, or up to the sliding window where llama.cpp
    attends to every position instead (Mistral, Phi-3)."""
    window = getattr(config, "sliding_window", None)
    if shape.family.window_caps_context and window:
        return min(config.max_position_embeddings, window)
    return config.max_position_embeddings


def write_hyperparameters(writer, config, shape: Shape) -> None:
    """The `<arch>.*` keys llama.cpp reads to build the model."""
    rope = rope_parameters(config)
    writer.add_context_length(context_length(config, shape))
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_key_length(shape.head_dim)
    writer.add_value_length(shape.head_dim)
    writer.add_rope_dimension_count(shape.rotary_dims or shape.head_dim)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    if rope.get("rope_type") == "linear":
        from gguf import RopeScalingType

        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if shape.family.keys is not None:
        shape.family.keys(writer, config, shape)


def extra_tensors(config, shape: Shape) -> dict[str, torch.Tensor]:
    """Tensors llama.cpp needs that a transformers checkpoint computes instead of storing: the family's own, and
    Llama 3.1's rotary frequency factors (`rope_type: llama3`), as the divisor llama.cpp applies to each frequency."""
    if shape.family.tensors is not None:
        return shape.family.tensors(config, shape)
    rope = rope_parameters(config)
    if rope.get("rope_type") != "llama3":
        return {}
    dims = torch.arange(0, shape.head_dim, 2, dtype=torch.float64) / shape.head_dim
    wavelengths = 2 * math.pi * rope["rope_theta"] ** dims
    original = rope["original_max_position_embeddings"]
    low, high = original / rope["low_freq_factor"], original / rope["high_freq_factor"]
    # Long wavelengths are slowed by `factor`, short ones kept, and those between blended linearly in 1/wavelength.
    blend = (original / wavelengths - rope["low_freq_factor"]) / (rope["high_freq_factor"] - rope["low_freq_factor"])
    divisor = 1 / ((1 - blend) / rope["factor"] + blend)
    divisor = torch.where(wavelengths > low, torch.full_like(divisor, rope["factor"]), divisor)
    divisor = torch.where(wavelengths < high, torch.ones_like(divisor), divisor)
    return {"rope_freqs.weight": divisor.float()}


class TensorNames:
    """transformers parameter names -> GGUF tensor names, with the row order llama.cpp expects."""

    def __init__(self, shape: Shape):
        import gguf

        arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == shape.family.arch)
        self.shape = shape
        self._map = gguf.get_tensor_name_map(arch, shape.layers)

    def name(self, hf_name: str) -> str:
        """`model.layers.0.self_attn.q_proj.weight` -> `blk.0.attn_q.weight`."""
        found = self._map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise UserError(f"tensor {hf_name}: llama.cpp's {self.shape.family.arch} architecture has no place for it")
        return found

    def rows(self, gguf_name: str, rows: torch.Tensor) -> torch.Tensor:
        """`rows` (a weight, bias or LoRA B matrix of `gguf_name`, output rows first) in llama.cpp's row order."""
        parts = gguf_name.split(".")
        heads = {"attn_q": self.shape.heads, "attn_k": self.shape.kv_heads}.get(parts[2]) if parts[0] == "blk" else None
        if not self.shape.family.pairs_rotary_rows or heads is None:
            return rows
        halves = rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:])
        return halves.transpose(1, 2).reshape(rows.shape)

    def weight(self, gguf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A model weight as llama.cpp computes with it: in its row order, and a norm's weight as the factor
        llama.cpp multiplies by (Gemma stores it less 1)."""
        if self.shape.family.norm_offset and gguf_name.endswith("_norm.weight"):
            return tensor + self.shape.family.norm_offset
        return self.rows(gguf_name, tensor)
