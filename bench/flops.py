"""Model FLOPs of LoRA training on the workload, and the matrix-product peak they are compared with (MFU).

Model FLOPs count the work training needs, whatever a trainer actually computes (padding is not counted), for
an example of L tokens of which T carry loss:
- frozen linear layers of the blocks (P weights): 2PL forward + 2PL backward (input gradients only; frozen
  weights need no weight gradient);
- LoRA adapters (P_lora = r x (in + out) per adapted layer): 2 P_lora L forward + 4 P_lora L backward;
- causal attention, per layer: QK^T and AV over L(L+1)/2 query-key pairs, 2 d_attn L(L+1) forward and twice
  that backward (d_attn = heads x head dim);
- output layer (vocabulary V, width D), only where a loss is taken: 2VD T forward + 2VD T backward.
Norms, activations, softmax and the optimizer are left out (a few percent at these sizes).
"""

from __future__ import annotations

import time

import numpy as np
import torch


def model_flops(model_path: str, lengths: np.ndarray, targets: np.ndarray, lora_r: int) -> float:
    """Training FLOPs of the examples with these lengths and target counts (all-linear LoRA of rank `lora_r`)."""
    from loratune import TrainConfig
    from loratune.memory.shape import read_shape

    s = read_shape(model_path, TrainConfig(model=model_path, lora_r=lora_r, lora_target_modules="all-linear"))
    lengths, targets = lengths.astype(np.float64), targets.astype(np.float64)
    return float(
        (4 * s.block_linear_params + 6 * s.lora_params) * lengths.sum()
        + 6 * s.layers * s.heads * s.head_dim * (lengths * (lengths + 1)).sum()
        + 4 * s.hidden * s.vocab * targets.sum()
    )


def matmul_peak(dtype: torch.dtype, device: str, repeats: int = 5) -> float:
    """Best FLOP/s of a large square matrix product in `dtype` on `device`, with all of its threads."""
    n = 8192 if device == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    per_call = max(1, round(2e12 / (2 * n**3))) if device == "cuda" else 1
    best = float("inf")
    for _ in range(repeats + 1):  # the first round warms up
        _sync(device)
        start = time.perf_counter()
        for _ in range(per_call):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - start) / per_call)
    return 2 * n**3 / best


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
