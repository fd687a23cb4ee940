"""Everything a run holds while it trains, and the small operations on it that several pieces of the loop share."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.config import TrainConfig
from ..core.console import Console, StepProgress
from ..data.plan import StepPlan
from ..data.prepare import Prepared
from ..memory.guard import RunMemory
from .checkpoint import TrainState
from .engine import Engine
from .metrics import Metrics
from .resolved import ResolvedRun
from .signals import StopRequest
from .tracking import Trackers


@dataclass
class Session:
    cfg: TrainConfig  # as the user gave it; never changed
    run: Path
    accelerator: object
    engine: Engine  # single process, DDP or FSDP2, and where
    console: Console
    device: torch.device
    dtype: torch.dtype
    tokenizer: object
    encoder: object
    data: Prepared
    model: torch.nn.Module  # the PEFT model
    loss_module: torch.nn.Module  # what the backward pass runs through (wrapped by DDP, or sharded by FSDP2)
    trainable: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: object
    plan: StepPlan  # of the training set; its micro-batch may be halved during the run
    val_plan: StepPlan
    resolved: ResolvedRun
    memory: RunMemory
    trackers: Trackers
    state: TrainState = field(default_factory=TrainState)
    partial: list | None = None  # gradients of a step cut in the middle, restored before its next pass
    metrics: Metrics | None = None
    progress: StepProgress | None = None
    stop: StopRequest = field(default_factory=StopRequest)
    segment_start: float = field(default_factory=time.perf_counter)  # of this process's part of the run
    elapsed_before: float = 0.0  # training seconds of earlier segments (a resumed run)
    test_before: dict | None = None

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def scores_test(self) -> bool:
        """Whether the held-out test set is answered during the run: by the main process alone, which needs the
        whole weights (not FSDP2's shard)."""
        return bool(self.data.test) and self.main and not self.engine.sharded

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.segment_start

    def all_sum(self, value: float) -> float:
        """The sum of `value` over all processes."""
        if self.processes == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.accelerator.device)
        return float(self.accelerator.reduce(tensor, reduction="sum"))

    def any_process(self, flag: bool) -> bool:
        return self.all_sum(float(flag)) > 0
