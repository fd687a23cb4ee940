"""The Training Guide's example configurations as presets, and its recommended ranges as warnings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel

from .config import TrainConfig

# --- Presets (the Guide's "Example Configurations") --------------------------------------------------


class Preset(BaseModel):
    description: str
    values: dict[str, Any]


def _quickstart_data(split: str) -> str:
    return str(Path(__file__).parents[1] / "quickstart" / "data" / f"{split}.jsonl")


PRESETS: dict[str, Preset] = {
    "balanced": Preset(
        description="The Training Guide's Balanced Training defaults. Use it first, on any data.",
        values={},
    ),
    "quick": Preset(
        description="A check that the whole pipeline works on your data and model: 10 small steps, "
        "validation at the end. Use it before a long run.",
        values={"batch_size": 4, "gradient_accumulation_steps": 4, "epochs": 1, "max_steps": 10},
    ),
    "memory_saver": Preset(
        description="Same effective batch (64) in smaller forward passes with activations recomputed. "
        "Use it when the plan says the run does not fit, or on a small GPU.",
        values={"batch_size": 4, "gradient_accumulation_steps": 16, "gradient_checkpointing": True},
    ),
    "high_capacity": Preset(
        description="Rank 32 adapters at a gentler learning rate. Use it for complex tasks or large datasets "
        "where the balanced adapter underfits (validation loss still falling at the end).",
        values={"lora_r": 32, "lora_alpha": 64, "learning_rate": 1e-4},
    ),
    "preference": Preset(
        description="DPO on preference pairs (prompt, chosen, rejected): a learning rate ten times below SFT's, as "
        "LoRA DPO commonly uses (2e-5; the Guide's range is for SFT, so the range warning shows), and 3 epochs, as "
        "preference losses overfit pairs fast. Use it on top of a model that already answers in the right form.",
        values={"objective": "dpo", "learning_rate": 2e-5, "epochs": 3, "warmup_ratio": 0.1},
    ),
    "quickstart": Preset(
        description="The built-in demo: SmolLM2-135M-Instruct learns to turn order messages into JSON records, "
        "on the CPU in minutes. `loratune train` with no arguments runs it.",
        values={
            "model": "smollm2-135m",
            "train_data": _quickstart_data("train"),
            "val_data": _quickstart_data("val"),
            "test_data": _quickstart_data("test"),
            "batch_size": 4,
            "gradient_accumulation_steps": 4,
            "max_length": 256,
            "epochs": 2,
            "learning_rate": 2e-4,
            "output_dir": "runs/quickstart",
        },
    ),
    "quickstart_dpo": Preset(
        description="The preference demo on the quickstart: DPO on top of the quickstart run (runs/quickstart, "
        "merged into the base: the starting point and the reference), on the pairs of that run's own mistakes on "
        "its training set (`loratune pairs runs/quickstart` writes runs/quickstart/pairs.jsonl), every pair trained "
        "on; the held-out test is answered before (the quickstart run's model) and after. The base stays in fp32: "
        "merged into a bf16 base, the quickstart run's small update is rounded and its answers change.",
        values={
            "model": "smollm2-135m",
            "objective": "dpo",
            "reference": "runs/quickstart",
            "train_data": "runs/quickstart/pairs.jsonl",
            "val_ratio": 0,
            "test_data": _quickstart_data("test"),
            "batch_size": 4,
            "gradient_accumulation_steps": 2,
            "max_length": 256,
            "epochs": 3,
            "learning_rate": 2e-4,
            "warmup_ratio": 0.1,
            "precision": "fp32",
            "output_dir": "runs/quickstart-dpo",
        },
    ),
}
DEFAULT_PRESET = "balanced"


# --- The Training Guide's recommended ranges become warnings ----------------------------------------


def guide_warnings(cfg: TrainConfig) -> list[str]:
    """Values outside the Guide's recommended ranges, each with the Guide's own advice. Training goes on."""
    out = []

    def check(name, value, lo, hi, shown, advice):
        if value is not None and not isinstance(value, str) and not (lo <= value <= hi):
            out.append(f"{name}={value:g} is outside the Training Guide's recommended range {shown}: {advice}")

    check(
        "batch_size",
        cfg.batch_size,
        4,
        16,
        "4-16",
        '"Higher values = faster training, more memory. Lower values = slower training, less memory."',
    )
    check(
        "gradient_accumulation_steps",
        cfg.gradient_accumulation_steps,
        4,
        32,
        "4-32",
        '"Lower values = faster training, more memory usage."',
    )
    check(
        "learning_rate",
        cfg.learning_rate,
        5e-5,
        2e-4,
        "5e-5 to 2e-4",
        '"Higher values = faster learning but risk instability. Lower values = more stable but slower training."',
    )
    check(
        "warmup_ratio",
        cfg.warmup_ratio,
        0.03,
        0.1,
        "0.03-0.1",
        '"Higher values = more stable start but slower training. '
        'Lower values = faster training but might be unstable."',
    )
    check(
        "lora_r",
        cfg.lora_r,
        8,
        32,
        "8-32",
        '"Higher values = more capacity but larger adapter. Lower values = smaller adapter but limited capacity."',
    )
    out += _alpha_warning(cfg)
    return out


def _alpha_warning(cfg: TrainConfig) -> list[str]:
    """The Guide's 2x-4x lora_r keeps the update's scale alpha/r between 2 and 4; with rsLoRA the scale is
    alpha/sqrt(r), so the same advice reads alpha = 2x-4x sqrt(lora_r)."""
    root = cfg.lora_r**0.5 if cfg.use_rslora else cfg.lora_r
    if 2 * root <= cfg.lora_alpha <= 4 * root:
        return []
    advice = (
        '"Usually set to 2x-4x of lora_r. Higher values = stronger adaptation effect. '
        'Lower values = more conservative changes."'
    )
    if not cfg.use_rslora:
        return [f"lora_alpha={cfg.lora_alpha} is not 2x-4x lora_r={cfg.lora_r} as the Training Guide advises: {advice}"]
    return [
        f"lora_alpha={cfg.lora_alpha} with use_rslora scales updates by lora_alpha/sqrt(lora_r) = "
        f"{cfg.lora_alpha / root:.2g}, outside the 2-4 that the Training Guide's alpha advice gives (2x-4x "
        f"sqrt(lora_r) = {2 * root:.3g}-{4 * root:.3g} here): {advice}"
    ]
