"""What a run resolves from what its config asked, worked out in one place: `resolve`.

Training, `loratune plan`, `eval`, `data inspect` and the UI's plan all call `resolve`, so what a plan says is what
training then does: the device and the base's number format, the engine, packing and shape buckets, the training
and validation `StepPlan`s, the step and warmup counts, and the micro-batch with where it came from (the config,
`batch_size: auto`, the memory check on a GPU, or a step that ran out of memory). The one rule for a smaller
micro-batch is `StepPlan.smaller`, and `ResolvedRun.smaller` applies it to the plans and the record together.

The config the user gave is never changed; `resolved.json` beside `config.yaml` is this object's record. Resume,
summary.json and the report read it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from ..core.config import TrainConfig
from ..core.files import atomic_write
from ..data.plan import StepPlan, max_length_plan, plan_for, wants_shape_buckets
from ..memory.arithmetic import MemoryModel
from ..memory.planner import Budget, choose_batch_size, estimate, largest_fitting, refusal, size_text


@dataclass(frozen=True)
class ResolvedRun:
    device: str  # cpu, cuda, mps
    precision: str  # the frozen base's dtype: bfloat16, float16, float32
    engine: str  # single process, DDP, FSDP2, ZeRO-2, ZeRO-3
    packing: bool
    shape_buckets: bool  # packed rows filled up to a few fixed sizes (CPU, 16-bit base)
    processes: int
    batch_size: int  # examples per pass now (packed: the pass's token budget in longest examples)
    gradient_accumulation_steps: int  # passes per step and process, at most
    examples_per_step: int  # batch_size x gradient_accumulation_steps x processes; never changes in a run
    batch_size_from: str  # config, batch_size auto, or why it was made smaller
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    plan: StepPlan | None = field(default=None, compare=False, repr=False)  # the training set's; not recorded
    val_plan: StepPlan | None = field(default=None, compare=False, repr=False)

    def record(self) -> dict:
        """What resolved.json holds (and `loratune plan --json` prints under "resolved")."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.compare}

    def with_micro_batch(self, micro_batch: int, why: str) -> ResolvedRun:
        """The same steps in passes of another size (the update does not change)."""
        plan = self.plan.with_micro_batch(micro_batch)
        val = self.val_plan.with_micro_batch(micro_batch) if self.val_plan is not None else None
        return replace(
            self,
            batch_size=micro_batch,
            gradient_accumulation_steps=plan.accumulation,
            batch_size_from=why,
            plan=plan,
            val_plan=val,
        )

    def smaller(self, why: str) -> ResolvedRun | None:
        """The next smaller micro-batch (`StepPlan.smaller`), or None at 1."""
        micro_batch = self.plan.smaller()
        return None if micro_batch is None else self.with_micro_batch(micro_batch, why)

    def eval_plan(self, cfg: TrainConfig, data, processes: int = 1) -> StepPlan:
        """Passes over a tokenized set (`lengths`, `target_counts`) as this run's validation makes them: `eval` of a
        finished run, and the validation plan itself."""
        plan = plan_for(
            cfg,
            data.lengths,
            data.target_counts,
            packing=self.packing,
            processes=processes,
            buckets=self.shape_buckets,
            pair_widths=getattr(data, "pair_widths", None),
        )
        return plan.with_micro_batch(self.batch_size)

    def write(self, run: Path) -> None:
        atomic_write(run / "resolved.json", json.dumps(self.record(), indent=1))

    @classmethod
    def read(cls, run: Path) -> ResolvedRun | None:
        """The run folder's resolved.json, or None when it has none (stopped before it was written)."""
        try:
            return cls(**json.loads((run / "resolved.json").read_text()))
        except (OSError, ValueError, TypeError):
            return None


def resolve(
    cfg: TrainConfig,
    mm: MemoryModel,
    budget: Budget,
    *,
    device,
    train=None,
    val=None,
    engine: str = "single process",
    processes: int = 1,
) -> tuple[ResolvedRun, list[tuple[bool, str]]]:
    """The run `cfg` makes on this device and engine over these tokenized sets (`train`, `val`: objects with
    `lengths` and `target_counts`; without `train`, examples of max_length). Returns it with the notes to show,
    (level, line) with level info, warning or refusal: training stops at a refusal (not even batch_size 1 fits),
    a plan shows it. `batch_size: auto` with nothing that fits raises the UserError itself."""
    # grpo's passes are padded rows of sampled answers: a prompt's sequences exist only once sampled
    packing = cfg.packing and mm.shape.packs and cfg.objective != "grpo"
    buckets = packing and wants_shape_buckets(device, mm.dtype)
    if train is None:
        plan = max_length_plan(cfg, packing=packing, processes=processes, buckets=buckets)
    else:
        plan = plan_for(
            cfg,
            train.lengths,
            train.target_counts,
            packing=packing,
            processes=processes,
            buckets=buckets,
            pair_widths=getattr(train, "pair_widths", None),
        )
    plan, batch_size_from, notes = _micro_batch(cfg, mm, budget, plan, from_data=train is not None)
    total_steps = plan.steps_per_epoch * cfg.epochs
    total_steps = total_steps if cfg.max_steps is None else min(cfg.max_steps, total_steps)
    resolved = ResolvedRun(
        torch.device(device).type,
        str(mm.dtype).removeprefix("torch."),
        engine,
        packing,
        buckets,
        processes,
        plan.micro_batch,
        plan.accumulation,
        plan.examples_per_step,
        batch_size_from,
        plan.steps_per_epoch,
        total_steps,
        math.ceil(cfg.warmup_ratio * total_steps),
        plan,
    )
    if val is not None:  # sharded engines run every validation pass on every process
        resolved = replace(resolved, val_plan=resolved.eval_plan(cfg, val, 1 if mm.shards > 1 else processes))
    return resolved, notes


def _micro_batch(cfg: TrainConfig, mm: MemoryModel, budget: Budget, plan: StepPlan, from_data: bool):
    """`batch_size: auto`'s choice, or the config's with a warning when only a smaller one fits."""
    if cfg.batch_size == "auto":
        choice = choose_batch_size(mm, plan, budget, cfg, from_data)
        return plan.with_micro_batch(choice.batch_size), "batch_size auto", [("info", choice.reason)]
    memory = estimate(cfg, mm, plan, budget, from_data=from_data)
    if memory.fits:
        return plan, "config", []
    if largest_fitting(mm, plan, budget)[0] is None:
        return plan, "config", [("refusal", refusal(memory))]
    then = (
        "training will make the micro-batch smaller when memory runs out, keeping the effective batch. To avoid the "
        "retries"
        if plan.processes == 1
        else f"with {plan.processes} processes training stops when memory runs out (it does not make the "
        "micro-batch smaller). To avoid that"
    )
    warning = (
        f"batch_size {plan.micro_batch} needs about {size_text(memory.total)} at its largest pass, more than "
        f"{budget.source}: {then}, change one of: " + "; ".join(memory.fixes)
    )
    return plan, "config", [("warning", warning)]
