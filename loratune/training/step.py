"""One optimizer step: this process's forward and backward passes, then the update.

The loss of a step is the sum of the cross-entropy over all its target tokens, in all passes and processes,
divided by their count: the update is the same whatever the split into passes and processes. A step that runs out
of memory is replayed with passes half the size (the same examples, the same update); a stop requested between
two passes saves the step's gradients so far, and the resumed run continues at the next pass.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ..core.errors import UserError
from .checkpoint import save_checkpoint
from .engine import no_sync
from .session import Session
from .signals import Interrupted


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean over the step's target tokens
    grad_norm: float  # before clipping
    lr: float  # the rate this update used
    tokens: int  # the examples' tokens, all processes
    positions: int  # tokens of the passes, padding included, all processes
    targets: int  # tokens with loss, all processes
    seconds: float
    finite: bool  # a NaN or infinite loss or gradient skips the update


def train_step(s: Session, examples) -> StepResult:
    """Run one optimizer step on these examples (all processes'); updates `s.state`."""
    targets = int(s.plan.targets[examples].sum())
    while True:
        start = time.perf_counter()
        try:
            tokens, positions = _passes(s, s.plan.passes(examples), targets)
            break
        except torch.OutOfMemoryError:
            pass
        _halve(s)  # outside the except block, so the failed pass's tensors can be freed
    return _update(s, targets, s.all_sum(tokens), s.all_sum(positions), start)


def _passes(s: Session, passes: list[list[int]], targets: int) -> tuple[int, int]:
    """Forward and backward of this process's passes from `s.state.pass_in_step` on; returns their tokens and
    positions. Gradients add up over the passes and, at the last one, over the processes."""
    state, world = s.state, s.processes
    mine = passes[s.rank :: world]
    state.micro_batch = s.plan.micro_batch
    if s.partial is not None:  # a step cut in the middle: its gradients so far were saved
        for p, g in zip(s.trainable, s.partial):
            p.grad = g.to(p.device)
        s.partial = None
    tokens = positions = 0
    for i in range(state.pass_in_step, len(mine)):
        batch = s.plan.batch(s.data.train, mine[i], s.pad_id).to(s.device)
        s.memory.raise_if_over(batch)
        sync = i == len(mine) - 1
        with nullcontext() if sync else no_sync(s.accelerator, s.engine, s.loss_module):
            loss_sum = s.loss_module(batch)
            # Divide by the step's target count (x processes, since DDP averages): the update is the mean over all
            # the step's target tokens whatever the split into passes and processes.
            backward = s.loss_module.backward if s.engine.deepspeed else s.accelerator.backward
            backward(loss_sum * (world / targets))
        state.step_loss_sum += float(loss_sum.detach())
        tokens += batch.n_tokens
        positions += batch.input_ids.numel()
        state.pass_in_step = i + 1
        if s.stop.requested and not sync and world == 1 and not s.engine.deepspeed:  # one process's gradients
            _save_cut_step(s)
            raise Interrupted(s.run, s.stop.signal_name)
    return tokens, positions


# Several processes: the others are in the middle of the same step, some inside a collective operation that waits for
# this one, so they cannot all go back and replay it together. The launcher stops them when this one exits.
_NOT_HALVED = (
    ". With {} processes the micro-batch is not halved during the run: resume the last checkpoint with --resume and "
    "a smaller batch_size (and gradient_accumulation_steps raised to keep the effective batch)"
)


def _halve(s: Session) -> None:
    """Free the failed step's gradients and halve the passes that replay it; the step keeps its examples, so the
    update is the same (the loss is normalised by the step's target count)."""
    plan, world = s.plan, s.processes
    if plan.micro_batch == 1 or world > 1 or s.engine.deepspeed:
        raise UserError(s.memory.out_of_memory(plan) + (_NOT_HALVED.format(world) if world > 1 else ""), exit_code=1)
    s.optimizer.zero_grad(set_to_none=True)
    s.state.pass_in_step, s.state.step_loss_sum = 0, 0.0
    if s.device.type == "cuda":
        torch.cuda.empty_cache()
    s.plan = plan.with_micro_batch(plan.micro_batch // 2)
    step = s.state.step + 1
    s.resolved = s.resolved.with_plan(s.plan, f"halved after running out of memory in step {step}")
    if s.main:
        s.resolved.write(s.run)
    s.progress.note(
        f"step {step}: out of memory; replaying it with batch_size {s.plan.micro_batch} "
        "(smaller passes, the same effective batch)"
    )
    s.metrics.write(event="out_of_memory", step=step, batch_size=s.plan.micro_batch)


def _update(s: Session, targets: int, tokens: int, positions: int, start: float) -> StepResult:
    """Clip, skip a non-finite update, step the optimizer and the schedule, and move the state one step on."""
    state = s.state
    loss = s.all_sum(state.step_loss_sum) / targets
    grad_norm, finite = (_deepspeed_update if s.engine.deepspeed else _optimizer_update)(s, loss)
    if finite:
        state.nonfinite_streak = 0
    else:
        state.nonfinite_streak += 1
        state.nonfinite_total += 1
        s.progress.note(f"step {state.step + 1}: non-finite loss or gradient, update skipped")
    lr = s.scheduler.get_last_lr()[0]
    s.scheduler.step()
    state.step += 1
    state.step_in_epoch += 1
    state.pass_in_step, state.step_loss_sum = 0, 0.0
    state.tokens += int(tokens)
    state.target_tokens += targets
    return StepResult(loss, grad_norm, lr, int(tokens), int(positions), targets, time.perf_counter() - start, finite)


def _optimizer_update(s: Session, loss: float) -> tuple[float, bool]:
    """Clip (the norm over all processes' shards when sharded) to max_grad_norm > 0, then update unless the loss or
    the gradient is not finite. Returns the gradient norm before clipping, and whether the update was made."""
    grad_norm = float(s.accelerator.clip_grad_norm_(s.trainable, s.cfg.max_grad_norm or float("inf")))
    finite = math.isfinite(loss) and (math.isfinite(grad_norm) or s.cfg.precision == "fp16")
    if finite:
        s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    return grad_norm, finite


def _deepspeed_update(s: Session, loss: float) -> tuple[float, bool]:
    """DeepSpeed's step (training.zero): the same clipping; it skips an update whose gradient norm is not finite."""
    s.loss_module.step()
    grad_norm = float(s.loss_module.get_global_grad_norm())
    return grad_norm, math.isfinite(loss) and math.isfinite(grad_norm)


def _save_cut_step(s: Session) -> None:
    s.state.elapsed = s.elapsed()
    grads = [p.grad.detach().cpu() if p.grad is not None else torch.zeros_like(p, device="cpu") for p in s.trainable]
    save_checkpoint(s.run, s.model, s.loss_module, s.optimizer, s.scheduler, s.state, s.main, partial_grads=grads)
