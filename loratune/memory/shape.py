"""A model's sizes for the memory estimate, read from its config.json alone (no weights are loaded)."""

from __future__ import annotations

import re

import torch

from ..core.config import TrainConfig
from ..core.errors import UserError
from .arithmetic import ModelShape

SAVED = ".modules_to_save."  # PEFT's name for the trained copies of modules_to_save


def read_shape(model_path: str, cfg: TrainConfig) -> ModelShape:
    """The shape of the model at `model_path` (a folder or hub id) with cfg's LoRA; reads config.json only."""
    from transformers import AutoConfig

    from ..modeling.model import hub_hint

    try:
        config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as e:
        raise UserError(hub_hint(model_path, e)) from None
    # Positions past the model's last one have no position embedding (or rotary range) it was trained with.
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    if limit and cfg.max_length > limit:
        raise UserError(
            f"max_length = {cfg.max_length}: above the {limit} positions {cfg.model!r} was built for "
            f"(max_position_embeddings in its config.json); allowed: 8 to {limit}"
        )
    return shape_from_config(config, cfg)


def shape_from_config(config, cfg: TrainConfig) -> ModelShape:
    """Build the model on the meta device (no memory, no weights) and count its parameters with LoRA added."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper
    from transformers import AutoModelForCausalLM

    from ..modeling.adapter import add_lora, supports_packing

    with torch.device("meta"):
        model = add_lora(AutoModelForCausalLM.from_config(config), cfg)
    head = model.get_output_embeddings()
    head_parts = set(head.modules())  # with modules_to_save, its wrapper holds the original and the trained copy
    frozen = {id(p): p.numel() for p in model.parameters() if not p.requires_grad}
    linears = {
        name.removesuffix(".base_layer"): m
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and m not in head_parts and not m.weight.requires_grad
    }
    linear = {id(m.weight) for m in linears.values()}
    adapted = {name for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    text = config.get_text_config()
    heads = text.num_attention_heads
    return ModelShape(
        model_type=text.model_type,
        layers=text.num_hidden_layers,
        hidden=text.hidden_size,
        intermediate=text.intermediate_size,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        vocab=text.vocab_size,
        block_linear_params=sum(n for k, n in frozen.items() if k in linear),
        other_params=sum(n for k, n in frozen.items() if k not in linear),
        lora_params=sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and SAVED not in n),
        saved_params=sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and SAVED in n),
        head_trained=isinstance(head, ModulesToSaveWrapper),
        linears=tuple(
            (name.rsplit(".", 1)[-1], m.in_features, m.out_features, name in adapted)
            for name, m in linears.items()
            if re.search(r"\.0\.", name)  # the first block's
        ),
        rank=cfg.lora_r,
        packs=supports_packing(model.get_base_model()),
    )
