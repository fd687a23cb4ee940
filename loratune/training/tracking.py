"""Experiment trackers users already run, through accelerate's tracker classes: TensorBoard, Weights & Biases, MLflow.

Off unless `report_to` names one; metrics.jsonl is written either way. Each tracker gets the resolved config at
the start, every metrics record (as train/loss, eval/val_loss, ...) at its step, and the summary at the end.
Only the main process logs. Self-contained rather than `Accelerator(log_with=...)`: the trackers start once
the run folder exists (TensorBoard writes into it) and know the step a resumed run restarts from.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from ..core.errors import UserError

# report_to name -> the package it needs (also the name of loratune's extra that installs it)
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
PROJECT = "loratune"  # W&B project / MLflow experiment unless WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME say otherwise


class Trackers:
    """Create at the start of training (checks the packages), `start` once the run folder exists, `log` each
    metrics record, `finish` at the end."""

    def __init__(self, names: list[str], enabled: bool = True):
        for name in names:
            if importlib.util.find_spec(PACKAGES[name]) is None:
                raise UserError(
                    f"report_to: {name} needs the {PACKAGES[name]} package, which is not installed; install it with "
                    f"pip install 'loratune[{name}]' or remove {name} from report_to"
                )
        self.names = list(names) if enabled else []
        self.active: list = []

    def start(self, run: Path, config: dict, step: int = 0) -> None:
        """Open each tracker for the run in `run`; `step` > 0 resumes: TensorBoard hides its later events."""
        from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

        for name in self.names:
            if name == "tensorboard":  # events in RUN/tensorboard: `tensorboard --logdir runs` finds every run
                tracker = TensorBoardTracker("tensorboard", run, **({"purge_step": step + 1} if step else {}))
            elif name == "wandb":
                tracker = WandBTracker(os.environ.get("WANDB_PROJECT", PROJECT), name=run.resolve().name, dir=str(run))
            else:
                tracker = MLflowTracker(PROJECT, run_name=run.resolve().name)
            tracker.start()
            tracker.store_init_configuration(_flat(config))
            self.active.append(tracker)

    def log(self, record: dict) -> None:
        """One metrics.jsonl record, e.g. {"event": "train", "step": 3, "loss": ...} -> train/loss at step 3."""
        if not self.active:
            return
        values = {
            f"{record['event']}/{k}": v for k, v in record.items() if k not in ("event", "step", "time") and _number(v)
        }
        for tracker in self.active:
            tracker.log(values, step=record["step"])

    def finish(self, summary: dict | None = None) -> None:
        if summary and self.active:
            values = {f"summary/{k}": v for k, v in _flat(summary).items() if _number(v)}
            for tracker in self.active:
                tracker.log(values, step=summary["steps"])
        for tracker in self.active:
            tracker.finish()
        self.active = []


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _flat(values: dict, prefix: str = "") -> dict:
    """Nested dicts as a/b keys; lists and None as text, which every tracker accepts as a parameter."""
    out = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
    return out
