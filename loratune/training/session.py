"""A run while it trains: the parts fixed once set up (`Session`: model, optimizer, data, engine, objective), and
the small state that changes (`Training`: the position saved with checkpoints, the live resolved run with its plans,
and the gradients of a step cut in the middle)."""

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
from ..modeling.objective import Objective
from ..planning.resolved import ResolvedRun
from .checkpoint import TrainState
from .engine import Engine
from .metrics import Metrics
from .plot_process import PlotProcess
from .signals import StopRequest
from .tracking import Trackers


@dataclass
class Training:
    """What changes while a run trains."""

    resolved: ResolvedRun  # its plans' micro-batch may be made smaller during the run
    state: TrainState = field(default_factory=TrainState)
    partial: list | None = None  # gradients of a step cut in the middle, restored before its next pass
    elapsed_before: float = 0.0  # training seconds of earlier segments (a resumed run)
    segment_start: float = field(default_factory=time.perf_counter)  # of this process's part of the run
    test_before: dict | None = None  # the base model's held-out scores
    progress: StepProgress | None = None  # the console's progress line, while the steps run
    plots: PlotProcess | None = None  # the helper that draws the run's plots (main process, `loratune train`)

    def smaller_passes(self, run: Path, main: bool, why: str) -> bool:
        """Make the passes smaller (`ResolvedRun.smaller`), in the plans and resolved.json together; False when
        they are as small as they go."""
        smaller = self.resolved.smaller(why)
        if smaller is None:
            return False
        self.resolved = smaller
        if main:
            smaller.write(run)
        return True


@dataclass(frozen=True)
class Session:
    cfg: TrainConfig  # as the user gave it; never changed
    run: Path
    engine: Engine  # one process, DDP, FSDP2 or ZeRO, and where
    console: Console
    dtype: torch.dtype
    tokenizer: object
    encoder: object
    data: Prepared
    objective: Objective
    model: torch.nn.Module  # the PEFT model
    module: torch.nn.Module  # the objective's module, as the engine wrapped it: what the passes run through
    trainable: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: object
    memory: RunMemory
    trackers: Trackers
    metrics: Metrics
    training: Training
    stop: StopRequest = field(default_factory=StopRequest)

    @property
    def state(self) -> TrainState:
        return self.training.state

    @property
    def resolved(self) -> ResolvedRun:
        return self.training.resolved

    @property
    def plan(self) -> StepPlan:
        return self.training.resolved.plan

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def main(self) -> bool:
        return self.engine.accelerator.is_main_process

    @property
    def rank(self) -> int:
        return self.engine.accelerator.process_index

    @property
    def processes(self) -> int:
        return self.engine.processes

    @property
    def scores_test(self) -> bool:
        """Whether the held-out test set is answered during the run: by the main process alone, which needs the
        whole weights."""
        return bool(self.data.test) and self.main and self.engine.holds_whole_model

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def progress(self) -> StepProgress:
        return self.training.progress

    def elapsed(self) -> float:
        return self.training.elapsed_before + time.perf_counter() - self.training.segment_start

    def all_sum(self, value: float) -> float:
        """The sum of `value` over all processes."""
        if self.processes == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        return float(self.engine.accelerator.reduce(tensor, reduction="sum"))

    def any_process(self, flag: bool) -> bool:
        return self.all_sum(float(flag)) > 0
