"""The run folder and everything written into it: whole or absent, never half-written.

Layout of output_dir:
    config.yaml          resolved config          metrics.jsonl   one JSON object per event
    adapter/             best adapter (PEFT)      last/           last adapter (PEFT)
    checkpoints/step-N/  adapter + optimizer + scheduler + RNG + data position + early-stopping state
    summary.json         written at the end
Folders are written to a temporary sibling, flushed to disk, then renamed into place.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core.errors import UserError
from ..core.files import _io_message, atomic_dir, check_replaceable

CHECKPOINTS = "checkpoints"


@dataclass
class TrainState:
    """Where training stands; saved with every checkpoint so a resumed run continues exactly."""

    step: int = 0  # optimizer steps done
    examples_per_step: int = 0  # batch_size x gradient_accumulation_steps x processes
    epoch: int = 0
    step_in_epoch: int = 0  # steps done in the current epoch
    pass_in_step: int = 0  # forward passes done in the current step (non-zero only for an interrupted step)
    best_val_loss: float | None = None
    best_step: int | None = None
    best_epoch: float | None = None
    evals_since_best: int = 0
    nonfinite_streak: int = 0
    nonfinite_total: int = 0
    tokens: int = 0  # real (non-padding) tokens processed
    target_tokens: int = 0
    elapsed: float = 0.0  # training seconds, summed over resumed segments
    metrics_lines: int = 0  # lines of metrics.jsonl that belong to the run so far
    step_loss_sum: float = 0.0  # partial sums of an interrupted step
    step_targets: int = 0
    micro_batch: int = 0  # examples per forward pass in the current step (halved after running out of memory)
    stop_reason: str | None = None
    history: list[dict] = field(default_factory=list)  # validation losses so far

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        return cls(**json.loads(text))


def recover_replaced(final: Path) -> None:
    """Undo a replacement cut short between its two renames: put the previous version back."""
    if not final.exists():
        olds = sorted(final.parent.glob(f".{final.name}.old-*"), key=lambda p: p.stat().st_mtime)
        if olds:
            os.replace(olds[-1], final)


def clean_leftovers(run: Path) -> None:
    """Remove what interrupted saves left behind (temporary folders and files), after recovering replacements."""
    for name in ("adapter", "last"):
        recover_replaced(run / name)
    for folder in (run, run / CHECKPOINTS):
        for p in folder.glob(".*.tmp-*") if folder.is_dir() else []:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        for p in folder.glob(".*.old-*") if folder.is_dir() else []:
            shutil.rmtree(p, ignore_errors=True)


# What a run writes into its folder (eval-*.jsonl are `loratune eval` reports; dot-files are temporaries).
RUN_ENTRIES = {
    "adapter",
    "last",
    CHECKPOINTS,
    "config.yaml",
    "data.json",
    "fingerprint.json",
    "metrics.jsonl",
    "summary.json",
    "report.md",
    "loss.png",
    "tensorboard",
    "wandb",
}


def is_run_entry(entry: Path) -> bool:
    return (
        entry.name in RUN_ENTRIES
        or entry.name.startswith(".")
        or (entry.name.startswith("eval-") and entry.suffix == ".jsonl")
    )


def check_output_dir(path: Path, overwrite: bool, resume: bool) -> None:
    """Refuse to mix two runs in one folder, and to start a run that could not write its results. No side effects."""
    if path.exists() and not path.is_dir():
        raise UserError(f"output_dir {path}: exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not resume:
        if not overwrite:
            raise UserError(
                f"output_dir {path} already holds a run. Use --resume to continue it, --overwrite to replace it, "
                "or --output-dir for a new folder"
            )
        check_replaceable(path, "output_dir", is_run_entry)
    existing = next(p for p in [path, *path.resolve().parents] if p.exists())
    if not os.access(existing, os.W_OK):
        raise UserError(f"cannot write {path}: permission denied (choose another output_dir)")


def create_output_dir(path: Path, overwrite: bool, resume: bool) -> None:
    """Make the run folder (replacing an old run when asked), once everything before training has succeeded."""
    if overwrite and not resume and path.is_dir() and any(path.iterdir()):  # checked by check_output_dir
        shutil.rmtree(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(_io_message(path, e)) from None


def list_checkpoints(run: Path) -> list[Path]:
    """Whole checkpoints, oldest first (temporary folders of interrupted saves are ignored)."""
    folder = run / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.name.startswith("step-") and (p / "state.json").is_file()]
    return sorted(found, key=checkpoint_position)


def checkpoint_position(path: Path) -> tuple[int, int]:
    """(optimizer step, forward pass within the next step) from a name like step-000012 or step-000012.3"""
    step, _, passes = path.name.removeprefix("step-").partition(".")
    return int(step), int(passes or 0)


def save_checkpoint(run: Path, peft_model, optimizer, scheduler, state: TrainState, partial_grads=None) -> Path:
    name = f"step-{state.step:06d}" + (f".{state.pass_in_step}" if state.pass_in_step else "")
    final = run / CHECKPOINTS / name
    with atomic_dir(final) as tmp:
        peft_model.save_pretrained(tmp / "adapter")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        if partial_grads is not None:
            torch.save(partial_grads, tmp / "partial_grads.pt")
        (tmp / "state.json").write_text(state.to_json())
    return final


def prune_checkpoints(run: Path, keep: int, best_step: int | None) -> None:
    """Keep the `keep` most recent checkpoints and the best one."""
    found = list_checkpoints(run)
    for path in found[:-keep]:
        if checkpoint_position(path) != (best_step, 0):
            shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(path: Path, peft_model, optimizer, scheduler):
    """Restore weights, optimizer, schedule and RNG; return the saved state and any partial gradients."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(peft_model, load_file(path / "adapter" / "adapter_model.safetensors"))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    grads = path / "partial_grads.pt"
    partial = torch.load(grads, weights_only=False) if grads.is_file() else None
    return TrainState.from_json((path / "state.json").read_text()), partial


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
