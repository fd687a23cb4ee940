"""The run folder: what a run writes into it, the checks before a run may use it, and what must not change
between a run and its resumption.

Layout of output_dir:
    config.yaml          the config as given (resolved from defaults, preset, file and flags)
    resolved.json        what the run resolved: device, precision, packing, processes, micro-batch, steps
    data.json            what the data step found          fingerprint.json   data and model content hashes
    metrics.jsonl        one JSON object per event          summary.json       written at the end
    adapter/             best adapter (PEFT)                last/              last adapter (PEFT)
    checkpoints/step-N/  adapter + optimizer + scheduler + RNG + data position + early-stopping state
    report.md, loss.png  the report
Everything is written whole or not at all (core.files).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..core.config import TrainConfig
from ..core.errors import UserError
from ..core.files import check_replaceable, file_digest, io_message
from ..core.sources import read_run_config

CHECKPOINTS = "checkpoints"
RESOLVED = "resolved.json"


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
    RESOLVED,
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
        raise UserError(io_message(path, e)) from None


# --- What must not change when a run resumes ------------------------------------------------------------------

# Config fields that may change when resuming: they do not affect the result.
# The split of a step into passes and processes may change too, as long as each step keeps the same examples.
RESUMABLE_CHANGES = {
    "output_dir",
    "report_to",
    "save_every_steps",
    "keep_checkpoints",
    "test_data",
    "skip_bad_rows",
    "batch_size",
    "gradient_accumulation_steps",
    "torch_compile",
    "liger_kernels",
}


def fingerprint(cfg: TrainConfig, model_path: str) -> dict:
    """What must not change between a run and its resumption: data and model files, by content hash."""
    out = {}
    for key in ("train_data", "val_data"):
        value = getattr(cfg, key)
        if value and Path(value).exists():
            out[key] = file_digest(value)
    weights = list(Path(model_path).glob("*.safetensors")) if Path(model_path).is_dir() else []
    out["model"] = file_digest(weights[0]) if len(weights) == 1 else model_path
    return out


def check_resumable(run: Path, cfg: TrainConfig, current: dict) -> None:
    """Refuse to resume `run` with a config, data or model that would change the result."""
    saved = read_run_config(run)
    changed = [
        f"{k}: {getattr(saved, k)!r} -> {getattr(cfg, k)!r}"
        for k in TrainConfig.model_fields
        if k not in RESUMABLE_CHANGES and getattr(saved, k) != getattr(cfg, k)
    ]
    if changed:
        raise UserError(
            f"cannot resume {run}: the config changed ({'; '.join(changed)}). "
            "Use the original settings, or --overwrite to start over"
        )
    try:
        old = json.loads((run / "fingerprint.json").read_text())
    except (OSError, ValueError):  # stopped before the run's first files were all written, or damaged
        raise UserError(
            f"cannot resume {run}: its fingerprint.json (what the data and model were) is missing or "
            "damaged, so the run cannot be checked; start over with --overwrite"
        ) from None
    moved = [k for k in old if old[k] != current.get(k)]
    if moved:
        raise UserError(f"cannot resume {run}: {', '.join(moved)} changed since the run started (content hash differs)")
