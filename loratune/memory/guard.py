"""The memory side of a training run: the check before training, the cap, and the out-of-memory messages."""

from __future__ import annotations

import torch

from ..core.config import TrainConfig, parse_bytes
from ..data.plan import PassShape, StepPlan
from .arithmetic import MemoryModel, ModelShape, Sharding
from .planner import device_budget, fixes, peak_items


class RunMemory:
    """Asked by the training loop: the memory model and budget the run was resolved with, and out-of-memory errors.

    On CUDA, `max_memory` caps PyTorch's allocator, so a pass beyond it raises a real out-of-memory error. On CPU
    nothing runs out before the machine swaps, so a pass the estimate puts over `max_memory` raises one instead:
    that is how the recovery is tested without a GPU.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        shape: ModelShape,
        device: torch.device,
        dtype: torch.dtype,
        shards: int = 1,
        sharding: Sharding | None = None,
    ):
        self.cfg, self.device = cfg, torch.device(device)
        self.budget = device_budget(cfg, self.device)
        self.mm = MemoryModel.for_run(cfg, shape, self.device, dtype, shards, sharding)
        self.simulated = bool(cfg.max_memory) and self.device.type != "cuda"
        if cfg.max_memory and self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, parse_bytes(cfg.max_memory) / total), self.device)

    def raise_if_over(self, batch) -> None:
        """Under max_memory on CPU: the out-of-memory error a capped GPU would raise for this pass."""
        if not self.simulated:
            return
        size = PassShape(batch.input_ids.numel(), batch.n_targets, batch.input_ids.shape[0])
        if peak_items(self.mm, size, self.budget)[1] > self.budget.bytes:
            raise torch.OutOfMemoryError(f"pass of {size.tokens} tokens over max_memory {self.cfg.max_memory}")

    def out_of_memory(self, plan: StepPlan) -> str:
        """The error for an out-of-memory error that halving cannot fix."""
        found = fixes(self.mm, plan, self.budget, self.cfg, from_data=True, process=False)
        return f"out of memory at batch_size {plan.micro_batch}. Change one of: " + "; ".join(found)
