"""PEFT's LoRA variants as a run's settings ask for them: rsLoRA and DoRA (PEFT's layer options), PiSSA and OLoRA
(PEFT's initialisations, which move part of each base weight into the adapter), LoRA+ (a learning rate of its own
for lora_B: optimizer parameter groups) and modules_to_save (whole layers trained beside the adapters).

PiSSA and OLoRA leave W_res = W - s B0 A0 as the base, so an adapter saved as trained is only right on that
residual base. Saved adapters are therefore converted as PEFT's `path_initial_model_for_weight_conversion` does:
s (B A - B0 A0) = s' [B | -B0] [A ; A0], a plain LoRA of twice the rank on the original base (s' = s: alpha
doubled, or times sqrt(2) with rsLoRA). Everything that loads `adapter/` (generate, merge, export, PEFT, vLLM) then
sees plain LoRA on the original base.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..core.config import BASE_CHANGING_INITS

# lora_init -> PEFT's init_lora_weights (pissa_niter_4: PEFT's fast randomised SVD with 4 subspace iterations)
PEFT_INIT = {"kaiming": True, "gaussian": "gaussian", "pissa": "pissa", "pissa_fast": "pissa_niter_4", "olora": "olora"}
# PEFT's init_lora_weights of an adapter saved as trained on a changed base (a checkpoint's)
PEFT_BASE_CHANGING = {str(PEFT_INIT[name]) for name in BASE_CHANGING_INITS}
INITIAL = "loratune_initial_adapter"  # attribute of the PEFT model: its adapter as initialised, for the conversion


def lora_options(cfg) -> dict:
    """The variant settings of PEFT's LoraConfig."""
    return {
        "use_rslora": cfg.use_rslora,
        "use_dora": cfg.use_dora,
        "init_lora_weights": PEFT_INIT[cfg.lora_init],
        "modules_to_save": list(cfg.modules_to_save) or None,
    }


def keep_initial_adapter(model, cfg) -> None:
    """Remember the adapter as initialised (on the CPU) where the initialisation changed the base."""
    meta = any(p.is_meta for p in model.parameters())  # memory.shape counts a model built without weights
    if cfg.lora_init in BASE_CHANGING_INITS and not meta:
        initial = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if _lora_matrix(n)}
        setattr(model, INITIAL, initial)


def _lora_matrix(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def as_plain_lora(model, weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """The adapter's weights as plain LoRA on the original base (rank doubled) when the run's initialisation changed
    the base; else `weights` unchanged. Returns the weights and whether they were converted."""
    initial = getattr(model, INITIAL, None)
    if initial is None:
        return weights, False
    out = {}
    for name, value in weights.items():
        if ".lora_A." in name:
            value = torch.cat([value.cpu(), initial[name]], dim=0)
        elif ".lora_B." in name:
            value = torch.cat([value.cpu(), -initial[name]], dim=1)
        out[name] = value
    return out, True


def write_plain_lora_config(folder: Path) -> None:
    """adapter_config.json of a converted adapter: twice the rank, the same scale, PEFT's ordinary initialisation
    (so that loading it does not decompose the base again)."""
    path = folder / "adapter_config.json"
    settings = json.loads(path.read_text())
    settings["r"] *= 2
    settings["lora_alpha"] *= 2**0.5 if settings.get("use_rslora") else 2
    settings["init_lora_weights"] = True
    path.write_text(json.dumps(settings, indent=2, sort_keys=True))


def param_groups(model, cfg) -> list[dict]:
    """The trained parameters for AdamW: with LoRA+ (loraplus_lr_ratio above 1), lora_B in a group of its own at
    ratio x the learning rate; the schedule scales every group's rate alike."""
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.loraplus_lr_ratio == 1:
        return [{"params": [p for _, p in trained]}]
    b = [p for n, p in trained if ".lora_B." in n]
    rest = [p for n, p in trained if ".lora_B." not in n]
    return [{"params": rest}, {"params": b, "lr": cfg.learning_rate * cfg.loraplus_lr_ratio}]


def variant_notes(cfg) -> list[str]:
    """What the start of a run says about its variant: which layer computes it, and how its adapter is saved."""
    notes = []
    if cfg.use_dora:
        notes.append("use_dora: PEFT's own LoRA layer computes DoRA (loratune's fused layer computes plain LoRA only)")
    if cfg.lora_init in BASE_CHANGING_INITS:
        notes.append(
            f"lora_init {cfg.lora_init}: training runs on the base minus the adapter's initial part; adapters are "
            f"saved converted to plain LoRA of rank {2 * cfg.lora_r} (2 x lora_r) on the original base"
        )
    return notes
