"""Validation loss at the configured points, the best adapter kept, and early stopping decided."""

from __future__ import annotations

from ..modeling.evaluate import dataset_sums
from .outputs import save_adapter
from .session import Session


def due(s: Session, end_of_epoch: bool) -> bool:
    """Whether this step ends with an evaluation: every eval_every_steps, else at each epoch's end; and at the last
    step."""
    cfg, step = s.cfg, s.state.step
    every = cfg.eval_every_steps
    return bool((every and step % every == 0) or (not every and end_of_epoch) or step == s.resolved.total_steps)


def validation_loss(s: Session) -> tuple[float, dict[str, float]]:
    """The objective's mean loss over the validation set, and the means of its metrics. Each process runs its share
    of the passes (outside the engine's wrapper) unless the weights are sharded: then each runs every pass, as each
    gathers the weights."""
    plan = s.resolved.val_plan
    rank = s.rank if plan.processes > 1 else 0
    module = s.engine.unwrap(s.module)
    total, count, metrics = dataset_sums(s.objective, module, s.data.val, plan, s.pad_id, s.device, rank=rank)
    if plan.processes > 1:  # every process sums every metric the objective names, in the same order
        total, count = s.all_sum(total), s.all_sum(count)
        metrics = {name: s.all_sum(metrics[name]) for name in s.objective.metrics}
    return total / count, {name: metrics[name] / count for name in s.objective.metrics}


def validate(s: Session, epoch: float) -> None:
    """Measure the validation loss, keep the best adapter, and stop early after `early_stopping_patience`
    evaluations without an improvement of `early_stopping_min_delta`."""
    cfg, state = s.cfg, s.state
    val_loss, val_metrics = validation_loss(s)
    improved = state.best_val_loss is None or val_loss < state.best_val_loss - cfg.early_stopping_min_delta
    if improved:
        state.best_val_loss, state.best_step, state.best_epoch = val_loss, state.step, round(epoch, 4)
        state.evals_since_best = 0
        save_adapter(s.run / "adapter", s.engine, s.model, s.tokenizer, s.encoder.template)
    else:
        state.evals_since_best += 1
    state.history.append({"step": state.step, "val_loss": val_loss})
    s.metrics.write(
        event="eval", step=state.step, epoch=round(epoch, 4), val_loss=val_loss, best_val_loss=state.best_val_loss,
        **{f"val_{name}": value for name, value in val_metrics.items()},
    )  # fmt: skip
    best = " (best so far)" if improved else f" (best {state.best_val_loss:.4f} at step {state.best_step})"
    pairs = (
        f"; reward accuracy {val_metrics['reward_accuracy']:.0%}, margin {val_metrics['reward_margin']:.4f}"
        if "reward_accuracy" in val_metrics
        else f"; mean reward of greedy answers {val_metrics['reward']:.4f}"
        if "reward" in val_metrics
        else ""
    )
    s.progress.note(f"step {state.step}: validation loss {val_loss:.4f}{best}{pairs}")
    if cfg.early_stopping_patience and state.evals_since_best >= cfg.early_stopping_patience:
        state.stop_reason = (
            f"early stopping: validation loss did not improve by {cfg.early_stopping_min_delta} "
            f"for {state.evals_since_best} evaluations"
        )
