"""Time per epoch: a previous run's measured throughput, or a rough range from this device's matrix-product speed."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ..core.config import TrainConfig
from .arithmetic import MemoryModel


def measured_throughput(cfg: TrainConfig) -> float | None:
    """Median tokens/s of a previous run of this config (its metrics.jsonl), the first step left out as warm-up."""
    path = Path(cfg.output_dir or "runs/run") / "metrics.jsonl"
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return None
    rates = [r["tokens_per_s"] for r in rows if r.get("event") == "train" and r.get("step", 0) > 1]
    return float(np.median(rates)) if rates else None


# The share of the matrix-product rate a whole training step reaches (the elementwise work, the optimizer, the loss
# and Python between kernels are left out of the FLOPs): the range the plan shows and the middle it quotes, from
# whole runs measured against the benchmark (bench/results/plan-time-2026-12-08.md).
STEP_SHARE = (0.3, 0.45, 0.65)


def rough_throughput(mm: MemoryModel, mean_length: float, target_share: float) -> tuple[float, float, float]:
    """Tokens/s a training run is likely to reach: the lowest, the middle and the highest of STEP_SHARE of the
    matrix-product bound."""
    bound = _matmul_bound(mm, mean_length, target_share)
    low, middle, high = (bound * share for share in STEP_SHARE)
    return low, middle, high


def _matmul_bound(mm: MemoryModel, mean_length: float, target_share: float) -> float:
    """Tokens/s if a step were only its matrix products, from this device's measured matrix-product rate and the
    FLOPs a training token costs.

    Per token: the frozen linear layers forward and their input gradients (4 x parameters; 6 x when checkpointing
    recomputes the forward), attention within its example, LoRA forward and backward, and for target tokens the
    output layer with the hidden-state gradient. On a busy machine the benchmark is slowed down with the run.
    """
    s = mm.shape
    passes = 3 if mm.checkpointing else 2  # forward-sized units of matrix work: forward, backward (, recompute)
    attention = s.layers * mean_length * s.heads * s.head_dim
    flops = 2 * passes * s.block_linear_params + (passes + 1) * 2 * attention + 6 * s.lora_params
    flops += target_share * 4 * s.hidden * s.vocab
    return _matmul_flops(mm, 2048) / flops


def _matmul_flops(mm: MemoryModel, rows: int, seconds: float = 0.3) -> float:
    """FLOP/s of [rows, hidden] @ [hidden, intermediate] in the base dtype on the device (the blocks' main product)."""
    device = torch.device(mm.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a = torch.randn(rows, mm.shape.hidden, dtype=mm.dtype, device=device)
    b = torch.randn(mm.shape.hidden, mm.shape.intermediate, dtype=mm.dtype, device=device)
    a @ b  # warm-up
    sync()
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
        sync()
    return 2 * rows * mm.shape.hidden * mm.shape.intermediate * n / (time.perf_counter() - start)
