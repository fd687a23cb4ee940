"""The trainable model: the frozen base made ready for loratune's training (packed attention, kernels,
activation checkpointing) with PEFT LoRA adapters. Training and the memory measurement assemble it the same way:
`trainable_model`."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import warnings

import torch

from ..core.errors import UserError
from .attention import NAME as PACKED_ATTENTION
from .lora import FusedLoraLinear
from .variants import keep_initial_adapter, lora_options


def check_kernels(cfg, device: torch.device) -> None:
    """Refuse the optional kernels where they cannot run, before anything is loaded."""
    if cfg.liger_kernels and device.type != "cuda":
        raise UserError(
            f"liger_kernels: Liger's kernels run on CUDA GPUs only, this run is on {device.type} "
            "(set liger_kernels: false)"
        )
    if cfg.liger_kernels and importlib.util.find_spec("liger_kernel") is None:
        raise UserError("liger_kernels needs the liger-kernel package: pip install liger-kernel")
    compilers = (os.environ.get("CXX"), "g++", "clang++", "c++")
    if cfg.torch_compile and device.type == "cpu" and not any(c and shutil.which(c) for c in compilers):
        raise UserError(
            "torch_compile on a CPU needs a C++ compiler (g++ or clang++, or CXX set to one); "
            "install one or set torch_compile: false"
        )


# --- Loading --------------------------------------------------------------------------------------------


def use_packed_attention(model) -> bool:
    """Attend within each example of a packed row (modeling.attention), where the model supports it."""
    if not supports_packing(model):
        return False
    model.set_attn_implementation(PACKED_ATTENTION)
    return True


def supports_packing(model) -> bool:
    """Packing needs a model whose attention goes through transformers' attention interface."""
    return bool(getattr(model, "_supports_attention_backend", False))


def enable_checkpointing(model) -> None:
    """Activation checkpointing of every decoder layer, non-reentrant (transformers 5.x renamed the call from
    gradient_checkpointing_enable, which now warns)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@contextlib.contextmanager
def quiet_peft():
    """PEFT calls a transformers API that transformers 5 marks deprecated; that warning is noise for our users."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def apply_liger(model) -> bool:
    """Liger's kernels in place of the model's RMSNorm, RoPE and SwiGLU (the output layer's loss is already ours,
    chunked); False when Liger has none for this model family."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    if model.config.model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return False
    _apply_liger_kernel_to_instance(
        model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
    )
    return True


def compile_layers(model) -> None:
    """torch.compile each decoder layer in place (parameter names unchanged, so saving is unaffected). Identical
    layers share compiled code; the packed attention's per-example loop and the loss stay eager. Dynamic shapes:
    every pass has its own length."""
    decoder = model.get_decoder()
    for layer in getattr(decoder, "layers", None) or [decoder]:
        layer.compile(dynamic=True)


def add_lora(model, cfg):
    """Wrap the frozen base with PEFT LoRA adapters; adapter weights are fp32 whatever the base dtype."""
    from peft import LoraConfig, get_peft_model

    _check_modules_to_save(model, cfg.modules_to_save)
    config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_target_modules,
        task_type="CAUSAL_LM",
        **lora_options(cfg),
    )
    config._register_custom_module({torch.nn.Linear: FusedLoraLinear})  # PEFT's layer, fused training path
    torch.manual_seed(cfg.seed)  # the adapters' initial weights depend on the seed alone
    try:
        with quiet_peft():
            peft_model = get_peft_model(model, config, autocast_adapter_dtype=True)
    except ValueError as e:
        if "not found in the base model" not in str(e) and "Target modules" not in str(e):
            raise
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise UserError(
            f"lora_target_modules = {cfg.lora_target_modules}: not found in the model; its linear layers are "
            f"{', '.join(names)} (or use all-linear)"
        ) from None
    keep_initial_adapter(peft_model, cfg)
    return peft_model


def _check_modules_to_save(model, names: list[str]) -> None:
    """Each name in modules_to_save must be a layer of the model (PEFT would train nothing for a misspelt one)."""
    present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    for name in names:
        if name.rsplit(".", 1)[-1] not in present:
            layers = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _whole_layer(m)})
            raise UserError(
                f"modules_to_save = {name}: not a layer of the model; its layers with weights include "
                f"{', '.join(layers)}"
            )


def _whole_layer(module) -> bool:
    return isinstance(module, (torch.nn.Linear, torch.nn.Embedding))


def trainable_model(base, cfg, packing: bool) -> tuple[torch.nn.Module, bool, list[str]]:
    """`base` with cfg's LoRA adapters, set up for training as cfg asks: packed attention when `packing` (and the
    model supports it), Liger's kernels, activation checkpointing, compiled layers. Returns the PEFT model, whether
    it packs, and warnings for what could not be done."""
    warnings_ = []
    if packing and not use_packed_attention(base):
        warnings_.append(f"{type(base).__name__} does not support packed attention; using padded batches instead")
        packing = False
    if cfg.liger_kernels and not apply_liger(base):
        warnings_.append(
            f"liger_kernels: Liger has no kernels for {base.config.model_type} models; training without them"
        )
    if cfg.gradient_checkpointing:
        enable_checkpointing(base)
    model = add_lora(base, cfg)
    if cfg.torch_compile:
        compile_layers(base)
    return model, packing, warnings_
