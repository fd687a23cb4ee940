"""Validation loss at the configured points, the best adapter kept, and early stopping decided."""

from __future__ import annotations

from torch.nn.parallel import DistributedDataParallel

from ..modeling.evaluate import dataset_loss
from .outputs import save_adapter
from .session import Session


def due(s: Session, end_of_epoch: bool) -> bool:
    """Whether this step ends with an evaluation: every eval_every_steps, else at each epoch's end; and at the last
    step."""
    cfg, step = s.cfg, s.state.step
    every = cfg.eval_every_steps
    return bool((every and step % every == 0) or (not every and end_of_epoch) or step == s.resolved.total_steps)


def validate(s: Session, epoch: float) -> None:
    """Measure the validation loss (all processes share the examples), keep the best adapter, and stop early after
    `early_stopping_patience` evaluations without an improvement of `early_stopping_min_delta`."""
    cfg, state = s.cfg, s.state
    plan = s.val_plan.with_micro_batch(s.plan.micro_batch)
    if s.engine.sharded:  # every pass gathers the weights from all processes: each runs all of them
        total, count = dataset_loss(s.loss_module, s.data.val, plan, s.pad_id, s.device)
    else:  # each its share, outside DDP, whose forward pass syncs buffers: shares may differ in passes
        module = _unwrapped(s)
        total, count = map(s.all_sum, dataset_loss(module, s.data.val, plan, s.pad_id, s.device, rank=s.rank))
    val_loss = total / count
    improved = state.best_val_loss is None or val_loss < state.best_val_loss - cfg.early_stopping_min_delta
    if improved:
        state.best_val_loss, state.best_step, state.best_epoch = val_loss, state.step, round(epoch, 4)
        state.evals_since_best = 0
        save_adapter(s.run / "adapter", s.model, s.tokenizer, s.encoder.template, s.main)
    else:
        state.evals_since_best += 1
    state.history.append({"step": state.step, "val_loss": val_loss})
    s.metrics.write(
        event="eval", step=state.step, epoch=round(epoch, 4), val_loss=val_loss, best_val_loss=state.best_val_loss
    )
    best = " (best so far)" if improved else f" (best {state.best_val_loss:.4f} at step {state.best_step})"
    s.progress.note(f"step {state.step}: validation loss {val_loss:.4f}{best}")
    if cfg.early_stopping_patience and state.evals_since_best >= cfg.early_stopping_patience:
        state.stop_reason = (
            f"early stopping: validation loss did not improve by {cfg.early_stopping_min_delta} "
            f"for {state.evals_since_best} evaluations"
        )


def _unwrapped(s: Session):
    """The loss module inside DDP's or DeepSpeed's wrapper. Not accelerate's unwrap_model: it imports DeepSpeed
    whenever it is installed, which prints DeepSpeed's warnings in runs that do not use it."""
    wrapped = isinstance(s.loss_module, DistributedDataParallel) or s.engine.deepspeed
    return s.loss_module.module if wrapped else s.loss_module
