"""What a run resolved, as opposed to what its config asked for: the config the user gave is never changed.

`config.yaml` in the run folder is the config; `resolved.json` beside it is this object: the device, the base's
number format, packing, the processes, and the micro-batch with where it came from (the config, `batch_size:
auto`, or halving after running out of memory). Resume, summary.json and the report read it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..core.files import atomic_write
from ..data.plan import StepPlan


@dataclass(frozen=True)
class ResolvedRun:
    device: str  # e.g. cpu, cuda:0
    precision: str  # the frozen base's dtype: bfloat16, float16, float32
    packing: bool
    processes: int
    batch_size: int  # examples per pass now (packed: the pass's token budget in longest examples)
    gradient_accumulation_steps: int  # passes per step and process, at most
    examples_per_step: int  # batch_size x gradient_accumulation_steps x processes; never changes in a run
    batch_size_from: str  # config, batch_size auto, or halved after out of memory
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int

    @classmethod
    def of(
        cls, plan: StepPlan, *, device, precision: str, total_steps: int, warmup_steps: int, batch_size_from: str
    ) -> ResolvedRun:
        return cls(
            str(device),
            precision,
            plan.packing,
            plan.processes,
            plan.micro_batch,
            plan.accumulation,
            plan.examples_per_step,
            batch_size_from,
            plan.steps_per_epoch,
            total_steps,
            warmup_steps,
        )

    def with_plan(self, plan: StepPlan, batch_size_from: str) -> ResolvedRun:
        """After the micro-batch changed (halved after running out of memory, or a resumed cut step's)."""
        return replace(
            self,
            batch_size=plan.micro_batch,
            gradient_accumulation_steps=plan.accumulation,
            batch_size_from=batch_size_from,
        )

    def write(self, run: Path) -> None:
        atomic_write(run / "resolved.json", json.dumps(asdict(self), indent=1))

    @classmethod
    def read(cls, run: Path) -> ResolvedRun | None:
        """The run folder's resolved.json, or None when it has none (stopped before it was written)."""
        try:
            return cls(**json.loads((run / "resolved.json").read_text()))
        except (OSError, ValueError, TypeError):
            return None
