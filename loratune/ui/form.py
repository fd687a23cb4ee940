"""The new-run form: its fields (TrainConfig's, the Training Guide's nine first), the Guide's warnings as the user
types, what `loratune plan` and `loratune data inspect` say before Start, and the `loratune train` command line
that Start runs."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from ..core.config import GUIDE_FIELDS, TrainConfig, allowed
from ..core.errors import UserError
from ..core.presets import DEFAULT_PRESET, PRESETS, guide_warnings
from ..core.sources import Resolved, resolve
from .jobs import Conflict

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
DATA_FIELDS = ("model", "train_data", "val_data", "test_data")
HIDDEN = {"output_dir"}  # the run's name sets it: a run started here lives in the runs folder
FROM_FLAG = re.compile(r" \(from --[a-z0-9-]+\)")  # the form has fields, not flags: its errors start with the name
NO_TRAIN_DATA = "give training data (a path, or Upload…) to start"


def schema() -> dict:
    """The form's fields in order, each with its default, help text and allowed values; and the presets."""
    defaults = TrainConfig().model_dump(mode="json")
    rest = [n for n in TrainConfig.model_fields if n not in (*GUIDE_FIELDS, *DATA_FIELDS, *HIDDEN)]
    groups = (("guide", GUIDE_FIELDS), ("model and data", DATA_FIELDS), ("more", rest))
    fields = [_field(name, group, defaults[name]) for group, names in groups for name in names]
    presets = {name: {"description": p.description, "values": p.values} for name, p in PRESETS.items()}
    return {"fields": fields, "presets": presets, "default_preset": DEFAULT_PRESET}


def _field(name: str, group: str, default: Any) -> dict:
    info = TrainConfig.model_fields[name]
    kind, choices = "text", None
    if info.annotation is bool:
        kind = "bool"
    elif get_origin(info.annotation) is Literal:
        kind, choices = "choice", [str(c) for c in get_args(info.annotation)]
    return {
        "name": name,
        "group": group,
        "kind": kind,
        "choices": choices,
        "default": default,
        "help": info.description,
        "allowed": allowed(name),
    }


def _flags(values: dict) -> dict[str, Any]:
    """The settings the user gave (the form sends those that differ from the preset's), as the CLI's flags."""
    if not isinstance(values, dict):
        raise UserError("settings: expected a mapping of setting names to values")
    unknown = [k for k in values if k not in TrainConfig.model_fields or k in HIDDEN]
    if unknown:
        raise UserError(f"unknown setting {unknown[0]!r}")
    wrong = [k for k, v in values.items() if v is not None and not isinstance(v, (str, int, float, bool))]
    if wrong:
        raise UserError(f"{wrong[0]}: expected text, a number or true/false")
    # The page sends a field only when it differs from the preset: an emptied one ("") clears the preset's value.
    return {k: v for k, v in values.items() if v is not None}


def resolve_form(values: dict, preset: str | None, output_dir: Path | None = None) -> Resolved:
    """The config a start with these values would train with, resolved exactly as `loratune train` resolves it."""
    flags = _flags(values)
    if output_dir is not None:
        flags["output_dir"] = str(output_dir)
    try:
        return resolve(None, preset or None, flags)
    except UserError as e:
        raise UserError(FROM_FLAG.sub("", str(e))) from None


def check(values: dict, preset: str | None) -> dict:
    """What is wrong (one line, and which field) and the Guide's range warnings by field (the other fields' still
    shown while one field is wrong)."""
    error = field = None
    try:
        cfg = resolve_form(values, preset).config
    except UserError as e:
        error, field = str(e), str(e).split(" ", 1)[0]
        field = field if field in TrainConfig.model_fields else None
        try:
            cfg = resolve_form({k: v for k, v in values.items() if k != field}, preset).config
        except UserError:  # something else is wrong too (or not one field): no warnings to trust
            return {"error": error, "field": field, "warnings": {}}
    warnings: dict[str, list[str]] = {}
    for message in guide_warnings(cfg):
        name = message.split("=", 1)[0]
        if name != field:
            warnings.setdefault(name, []).append(message)
    return {"error": error, "field": field, "warnings": warnings}


def plan_and_inspect(values: dict, preset: str | None, output_dir: Path) -> dict:
    """`loratune plan` (memory, batch size, time per epoch) and `loratune data inspect` (lengths, the recommended
    max_length) for the form's settings; each one's error as a line instead."""
    from ..commands.inspect import inspect, to_json
    from ..commands.plan import plan_run

    cfg = resolve_form(values, preset, output_dir).config
    out: dict[str, Any] = {"plan": None, "plan_error": None, "inspect": None, "inspect_error": None}
    try:
        plan = plan_run(cfg)
        out["plan"], out["plan_text"] = asdict(plan), plan.text()
    except UserError as e:
        out["plan_error"] = str(e)
    # Start waits for a plan that worked and for data (a data error is training's to report: it may skip rows).
    out["start_error"] = "the plan failed: see why above" if out["plan_error"] else None
    if not cfg.train_data:
        out["start_error"] = out["start_error"] or NO_TRAIN_DATA
        out["inspect_error"] = "give training data to see its lengths"
        return out
    try:
        out["inspect"] = json.loads(to_json(*inspect(cfg, 99.0)))
    except UserError as e:
        out["inspect_error"] = str(e)
    return out


def train_argv(values: dict, preset: str | None, output_dir: Path) -> tuple[list[str], dict[str, str]]:
    """`loratune train` arguments for the form's settings, and where each setting comes from. Raises the one-line
    error training would give for a bad value."""
    resolved = resolve_form(values, preset, output_dir)  # refuses what training would refuse, before it starts
    if not resolved.config.train_data:
        raise UserError(NO_TRAIN_DATA)
    argv = ["train", *(["--preset", preset] if preset else [])]
    for name, value in _flags(values).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:  # --flag=value: a value that starts with "-" is not taken for a flag
            argv.append(f"{flag}={_text(value)}")
    return [*argv, f"--output-dir={output_dir}"], resolved.sources


def _text(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def check_run_name(name: str, root: Path, reserved: set[str]) -> Path:
    """The folder of a new run named `name` in the runs folder; refuses names that could leave it or reuse a run."""
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name) or name in reserved:
        raise UserError(
            f"run name {name!r}: use letters, digits, '.', '_' and '-' (starting with a letter or digit), "
            f"not {', '.join(sorted(reserved))}"
        )
    folder = root / name
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise Conflict(f"run name {name!r}: {folder} already holds a run; choose another name")
    return folder
