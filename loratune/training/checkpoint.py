"""Checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint (RUN/checkpoints/step-N, or step-N.P when taken after pass P of step N+1) holds the adapter, the
optimizer and scheduler state, every random-number state, the position in the data and the early-stopping state,
and for a step cut in the middle its gradients so far. It is written whole or not at all (core.files.atomic_dir).

The engine reads and writes weights and optimizer state as whole tensors (training.engine), the optimizer state keyed
by parameter name, so a checkpoint resumes on another engine or number of processes. Resuming reads the checkpoint
whole first (`latest_checkpoint`), before the run is built, and `restore`s it once it is.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core.errors import UserError
from ..core.files import atomic_dir
from .run_folder import CHECKPOINTS


@dataclass
class TrainState:
    """Where training stands; saved with every checkpoint so a resumed run continues exactly."""

    step: int = 0  # optimizer steps done
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
    target_tokens: int = 0  # the objective's units (pairs for DPO): the name is kept for earlier checkpoints
    elapsed: float = 0.0  # training seconds, summed over resumed segments
    metrics_lines: int = 0  # lines of metrics.jsonl that belong to the run so far
    step_loss_sum: float = 0.0  # partial sums of an interrupted step
    micro_batch: int = 0  # batch_size of the current step's passes (a cut step resumes with the same)
    stop_reason: str | None = None
    history: list[dict] = field(default_factory=list)  # validation losses so far

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        return cls(**json.loads(text))


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


def save_checkpoint(run: Path, engine, model, module, optimizer, scheduler, state: TrainState, partial_grads=None):
    """Every process calls it (sharded weights and optimizer state are gathered from all); the main process writes
    the checkpoint and returns its path."""
    adapter = engine.adapter_state(model)
    optimizer_state = engine.optimizer_state(module, optimizer)
    if not engine.accelerator.is_main_process:
        return None
    name = f"step-{state.step:06d}" + (f".{state.pass_in_step}" if state.pass_in_step else "")
    final = run / CHECKPOINTS / name
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp / "adapter", state_dict=adapter)
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        if partial_grads is not None:
            torch.save(partial_grads, tmp / "partial_grads.pt")
        (tmp / "state.json").write_text(state.to_json())
    return final


def load_adapter(engine, model, saved: dict[str, torch.Tensor]) -> None:
    """Load an adapter file's weights (PEFT's names) into the model, each process taking its part."""
    from peft import get_peft_model_state_dict

    # PEFT's own renaming (the adapter's name dropped) applied to the parameter names, to map the file's names back
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    index = get_peft_model_state_dict(model, state_dict={n: torch.tensor(i) for i, n in enumerate(names)})
    if index.keys() != saved.keys():
        raise KeyError(f"the adapter file's weights are not this model's ({sorted(index.keys() ^ saved.keys())[:3]})")
    engine.load_adapter_state(model, {names[int(i)]: saved[k] for k, i in index.items()})


def prune_checkpoints(run: Path, keep: int, best_step: int | None) -> None:
    """Keep the `keep` most recent checkpoints and the best one."""
    found = list_checkpoints(run)
    for path in found[:-keep]:
        if checkpoint_position(path) != (best_step, 0):
            shutil.rmtree(path, ignore_errors=True)


@dataclass
class Checkpoint:
    """A checkpoint read whole into memory, before anything of the run is built (a few MB: LoRA's weights and
    AdamW's state)."""

    path: Path
    state: TrainState
    adapter: dict
    optimizer: dict
    scheduler: dict
    rng: dict
    partial: list | None  # gradients of a step cut in the middle


def read_checkpoint(path: Path) -> Checkpoint:
    from safetensors.torch import load_file

    grads = path / "partial_grads.pt"
    return Checkpoint(
        path,
        TrainState.from_json((path / "state.json").read_text()),
        load_file(path / "adapter" / "adapter_model.safetensors"),
        torch.load(path / "optimizer.pt", weights_only=False),
        torch.load(path / "scheduler.pt", weights_only=False),
        torch.load(path / "rng.pt", weights_only=False),
        torch.load(grads, weights_only=False) if grads.is_file() else None,
    )


def restore(c: Checkpoint, engine, model, module, optimizer, scheduler) -> None:
    """Set a read checkpoint's weights, optimizer and schedule state and random-number states."""
    load_adapter(engine, model, c.adapter)
    engine.load_optimizer_state(module, optimizer, c.optimizer)
    scheduler.load_state_dict(c.scheduler)
    set_rng_state(c.rng)


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


def latest_checkpoint(run: Path, console) -> Checkpoint | None:
    """The newest readable checkpoint of `run` (a damaged one falls back to an older one); None when the run has
    none yet. Reads files only: nothing of the run needs to be built."""
    found = list_checkpoints(run)
    if not found:
        console.info(f"{run} has no checkpoint yet: starting from the beginning")
        return None
    for path in reversed(found):
        try:
            checkpoint = read_checkpoint(path)
        except (OSError, RuntimeError, KeyError, ValueError, EOFError, pickle.UnpicklingError) as e:
            console.warn(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e)[:120]}); trying an older one")
            continue
        console.info(f"resuming from {path} (step {checkpoint.state.step}, epoch {checkpoint.state.epoch})")
        return checkpoint
    raise UserError(f"cannot resume {run}: no readable checkpoint; use --overwrite to start over")
