"""One optimizer step: this process's forward and backward passes, then the update.

The loss of a step is the sum of the objective's losses over all its units (target tokens for SFT), in all passes
and processes, divided by their count: the update is the same whatever the split into passes and processes. A step
that runs out of memory is replayed with smaller passes (the same examples, the same update); a stop requested
between two passes saves the step's gradients so far, and the resumed run continues at the next pass.
"""

from __future__ import annotations

import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from ..core.errors import UserError
from .checkpoint import save_checkpoint
from .session import Session
from .signals import Interrupted


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean over the step's units
    grad_norm: float  # before clipping
    lr: float  # the rate this update used
    tokens: int  # the examples' tokens, all processes
    positions: int  # tokens of the passes, padding included, all processes
    units: int  # what the loss is the mean over (target tokens for SFT), all processes
    seconds: float
    finite: bool  # a NaN or infinite loss or gradient skips the update
    metrics: dict[str, float] = field(default_factory=dict)  # the objective's other means over the step's units


def train_step(s: Session, examples) -> StepResult:
    """Run one optimizer step on these examples (all processes'); updates `s.state`."""
    while True:
        start = time.perf_counter()
        try:
            passes = s.plan.passes(examples)
            units = s.objective.start_step(
                s.engine.unwrap(s.module), s.plan, s.data.train, examples, passes[s.rank :: s.processes],
                s.state.step, s.all_sum,
            )  # fmt: skip
            tokens, positions, metrics = _passes(s, passes, units)
            break
        except torch.OutOfMemoryError:
            pass
        _smaller_passes(s)  # outside the except block, so the failed pass's tensors can be freed
    return _update(s, units, s.all_sum(tokens), s.all_sum(positions), metrics, start)


def _passes(s: Session, passes: list[list[int]], units: int) -> tuple[int, int, Counter]:
    """Forward and backward of this process's passes from `s.state.pass_in_step` on; returns their tokens,
    positions and the objective's metric sums. Gradients add up over the passes and, at the last one, over the
    processes."""
    state, world, engine = s.state, s.processes, s.engine
    mine = passes[s.rank :: world]
    state.micro_batch = s.plan.micro_batch
    if s.training.partial is not None:  # a step cut in the middle: its gradients so far were saved
        for p, g in zip(s.trainable, s.training.partial):
            p.grad = g.to(p.device)
        s.training.partial = None
    tokens = positions = 0
    metrics: Counter = Counter()
    for i in range(state.pass_in_step, len(mine)):
        batch = s.objective.batch(s.plan, s.data.train, mine[i], s.pad_id).to(s.device)
        s.memory.raise_if_over(batch)
        sync = i == len(mine) - 1
        with nullcontext() if sync else engine.no_sync(s.module):
            out = s.objective.forward(s.module, batch)
            # Divide by the step's unit count (x processes, since DDP averages): the update is the mean over all
            # the step's units whatever the split into passes and processes.
            engine.backward(s.module, out.loss * (world / units))
        state.step_loss_sum += float(out.loss.detach())
        metrics.update(out.metrics)
        tokens += batch.n_tokens
        positions += batch.input_ids.numel()
        state.pass_in_step = i + 1
        if s.stop.requested and not sync and engine.may_cut_steps and state.step % s.plan.repeats == 0:
            _save_cut_step(s)
            raise Interrupted(s.run, s.stop.signal_name)
    return tokens, positions, metrics


# Several processes: the others are in the middle of the same step, some inside a collective operation that waits for
# this one, so they cannot all go back and replay it together. The launcher stops them when this one exits.
_NOT_SMALLER = (
    ". With {} processes the micro-batch is not made smaller during the run: resume the last checkpoint with "
    "--resume and a smaller batch_size (and gradient_accumulation_steps raised to keep the effective batch)"
)


def _smaller_passes(s: Session) -> None:
    """Free the failed step's gradients and replay it with smaller passes; the step keeps its examples, so the
    update is the same (the loss is normalised by the step's unit count)."""
    step = s.state.step + 1
    why = f"made smaller after running out of memory in step {step}"
    if not (s.engine.may_replay_smaller and s.training.smaller_passes(s.run, s.main, why)):
        more = _NOT_SMALLER.format(s.processes) if s.processes > 1 else ""
        raise UserError(s.memory.out_of_memory(s.plan) + more, exit_code=1)
    s.optimizer.zero_grad(set_to_none=True)
    s.state.pass_in_step, s.state.step_loss_sum = 0, 0.0
    if s.device.type == "cuda":
        torch.cuda.empty_cache()
    s.progress.note(
        f"step {step}: out of memory; replaying it with batch_size {s.plan.micro_batch} "
        "(smaller passes, the same effective batch)"
    )
    s.metrics.write(event="out_of_memory", step=step, batch_size=s.plan.micro_batch)


def _update(s: Session, units: int, tokens: int, positions: int, metrics: Counter, start: float) -> StepResult:
    """Clip, skip a non-finite update, step the optimizer and the schedule, and move the state one step on."""
    state = s.state
    loss = s.all_sum(state.step_loss_sum) / units
    # every process reduces every metric the objective names, in one order, though a short step may leave a
    # process without a pass
    means = {name: s.all_sum(metrics[name]) / units for name in s.objective.metrics}
    grad_norm, finite = s.engine.update(s.module, s.optimizer, s.trainable, s.cfg, loss)
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
    state.target_tokens += units
    seconds = time.perf_counter() - start
    return StepResult(loss, grad_norm, lr, int(tokens), int(positions), units, seconds, finite, means)


def _save_cut_step(s: Session) -> None:
    s.state.elapsed = s.elapsed()
    grads = [p.grad.detach().cpu() if p.grad is not None else torch.zeros_like(p, device="cpu") for p in s.trainable]
    save_checkpoint(s.run, s.engine, s.model, s.module, s.optimizer, s.scheduler, s.state, partial_grads=grads)
