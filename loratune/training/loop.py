"""The training loop, read top to bottom: set up, fit, finish.

setup (training.setup): devices -> data -> step plan (batch_size auto, memory check) -> model + LoRA
    -> optimizer + schedule -> run folder (fresh, or resumed at its checkpoint)
fit: for each optimizer step: train_step (training.step: passes, update) -> log -> evaluate / early-stop
    (training.validation) -> checkpoint
finish (training.outputs): best adapter in adapter/, last in last/, test scores, summary.json, report
"""

from __future__ import annotations

import time

from ..core.config import TrainConfig
from ..core.console import Console
from ..core.errors import UserError
from .checkpoint import prune_checkpoints, save_checkpoint
from .outputs import base_test_scores, finish, phase
from .plot_process import PlotProcess
from .report import preload_plotting
from .session import Session
from .setup import setup
from .signals import Interrupted
from .step import StepResult, train_step
from .validation import due, validate


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
    plots: PlotProcess | None = None,
) -> dict:
    """Fine-tune `config.model` with LoRA on `config.train_data`; returns the run summary (also in summary.json).
    `plots`: a helper process started before torch was imported, to draw the plots (else this process does)."""
    s = setup(config, resume=resume, overwrite=overwrite, console=console)
    if s.main:
        s.training.plots = plots
        if plots is None:
            preload_plotting()
    s.training.progress = s.console.progress(s.resolved.total_steps, s.state.step)
    try:
        if s.scores_test:
            s.training.test_before = base_test_scores(s)
        s.training.segment_start = time.perf_counter()  # training time: from here, without the base model's test
        s.module.train()
        phase(s, "train", "training")
        with s.stop:
            fit(s)
        return finish(s)
    finally:
        s.progress.close()


def fit(s: Session) -> None:
    """Optimizer steps until the last one, or until early stopping or a stop request."""
    state, epoch = s.state, (-1, [])
    while state.step < s.resolved.total_steps and state.stop_reason is None:
        if epoch[0] != state.epoch:
            epoch = (state.epoch, s.plan.epoch(state.epoch))
        steps = epoch[1]
        if state.step_in_epoch == len(steps):
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
            continue
        examples = steps[state.step_in_epoch]
        result = train_step(s, examples)
        log_step(s, result, epoch=state.epoch + state.step_in_epoch / len(steps))
        if state.nonfinite_streak >= s.cfg.max_nonfinite_steps:
            raise UserError(_nonfinite_diagnosis(s, examples), exit_code=1)
        after_step(s, end_of_epoch=state.step_in_epoch == len(steps))


def log_step(s: Session, r: StepResult, epoch: float) -> None:
    padding_share = 1 - r.tokens / max(1, r.positions)
    units = {s.objective.unit_key: r.units, f"{s.objective.unit_key}_per_s": r.units / r.seconds}
    s.metrics.write(
        event="train", step=s.state.step, epoch=round(epoch, 4), loss=r.loss, lr=r.lr, grad_norm=r.grad_norm,
        tokens=r.tokens, tokens_per_s=r.tokens / r.seconds, **units, padding_share=padding_share, seconds=r.seconds,
        **r.metrics,
    )  # fmt: skip
    s.progress.update(s.state.step, epoch, r.loss, r.lr, r.tokens / r.seconds, padding_share)


def after_step(s: Session, end_of_epoch: bool) -> None:
    """Evaluate when due (keeping the best adapter, deciding early stopping), checkpoint when due, and stop with a
    checkpoint when a process was asked to stop."""
    state, cfg = s.state, s.cfg
    evaluate = due(s, end_of_epoch)
    if evaluate and len(s.data.val):
        phase(s, "validate", f"validating at step {state.step}")
        validate(s, epoch=state.epoch + state.step_in_epoch / s.resolved.steps_per_epoch)
    # A step that reuses the examples of the one before (grpo's later updates of one generation) needs what that
    # step sampled: runs resume only after the last of them, and redo the others the same way.
    resumable = state.step % s.plan.repeats == 0
    saves = resumable and (evaluate or (cfg.save_every_steps and state.step % cfg.save_every_steps == 0))
    if saves:
        phase(s, "save", f"saving a checkpoint at step {state.step}")
        checkpoint(s)
        if s.main:
            prune_checkpoints(s.run, cfg.keep_checkpoints, state.best_step)
        s.engine.accelerator.wait_for_everyone()
    if resumable and s.any_process(s.stop.requested):
        phase(s, "save", f"saving a checkpoint at step {state.step}, then stopping")
        checkpoint(s)
        raise Interrupted(s.run, s.stop.signal_name)
    if saves and state.step < s.resolved.total_steps and state.stop_reason is None:
        phase(s, "train", "training")


def checkpoint(s: Session) -> None:
    s.state.elapsed = s.elapsed()
    save_checkpoint(s.run, s.engine, s.model, s.module, s.optimizer, s.scheduler, s.state)
    s.objective.keep(s.data)


def _nonfinite_diagnosis(s: Session, examples) -> str:
    state = s.state
    origins = sorted({s.data.train.origins[i] for i in examples})[:5]
    return (
        f"training stopped: {state.nonfinite_streak} updates in a row had a NaN or infinite loss or gradient "
        f"(last at step {state.step}; learning_rate={s.cfg.learning_rate:g}, base precision "
        f"{s.resolved.precision}). Examples in the last step include: {'; '.join(origins)}. "
        "Try a lower learning_rate, precision fp32 or bf16, or check those examples. The last good checkpoint is kept."
    )
