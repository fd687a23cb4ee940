"""The memory side of a training run: the check before training, the cap, and the out-of-memory messages."""

from __future__ import annotations

import torch

from ..core.config import TrainConfig, parse_bytes
from ..data.plan import PassShape, StepPlan
from .arithmetic import MemoryModel, ModelShape
from .planner import (
    BatchChoice,
    _largest_fitting,
    choose_batch_size,
    device_budget,
    estimate,
    fixes,
    peak_items,
    require_fit,
    size_text,
)


class RunMemory:
    """Asked by the training loop: batch_size auto, the check before training, and out-of-memory errors.

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
        sharding: str = "FSDP2",
    ):
        self.cfg, self.device = cfg, torch.device(device)
        self.budget = device_budget(cfg, self.device)
        self.mm = MemoryModel.for_run(cfg, shape, self.device, dtype, shards, sharding)
        self.simulated = bool(cfg.max_memory) and self.device.type != "cuda"
        if cfg.max_memory and self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, parse_bytes(cfg.max_memory) / total), self.device)

    def choose_batch_size(self, plan: StepPlan) -> BatchChoice:
        return choose_batch_size(self.mm, plan, self.budget, self.cfg)

    def check(self, plan: StepPlan) -> str | None:
        """Before training: None when the run's largest pass fits; a warning when only a smaller micro-batch does
        (training will halve it when memory runs out); a UserError with the fixes when not even batch_size 1 fits."""
        memory = estimate(self.cfg, self.mm, plan, self.budget, from_data=True)
        if memory.fits:
            return None
        if _largest_fitting(self.mm, plan, self.budget)[0] is None:
            require_fit(memory)
        then = (
            "training will halve the micro-batch when memory runs out, keeping the effective batch. To avoid the "
            "retries"
            if plan.processes == 1
            else f"with {plan.processes} processes training stops when memory runs out (it does not halve the "
            "micro-batch). To avoid that"
        )
        return (
            f"batch_size {plan.micro_batch} needs about {size_text(memory.total)} at its largest pass, more than "
            f"{self.budget.source}: {then}, change one of: " + "; ".join(memory.fixes)
        )

    def raise_if_over(self, batch) -> None:
        """Under max_memory on CPU: the out-of-memory error a capped GPU would raise for this pass."""
        if not self.simulated:
            return
        size = PassShape(batch.input_ids.numel(), batch.n_targets, batch.input_ids.shape[0])
        if peak_items(self.mm, size, self.budget)[1] > self.budget.bytes:
            raise torch.OutOfMemoryError(f"pass of {size.tokens} tokens over max_memory {self.cfg.max_memory}")

    def out_of_memory(self, plan: StepPlan) -> str:
        """The error for an out-of-memory error that halving cannot fix."""
        found = fixes(self.mm, plan, self.budget, self.cfg, from_data=True)
        return f"out of memory at batch_size {plan.micro_batch}. Change one of: " + "; ".join(found)
