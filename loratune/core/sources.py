"""One config from its sources, later wins: field defaults < preset < YAML file < command-line flags; and where each
value came from. Also the YAML of a run folder's config.yaml."""

from __future__ import annotations

import re
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .config import TrainConfig, allowed
from .errors import UserError
from .presets import DEFAULT_PRESET, PRESETS
from .reward_spec import check_function_file, parse_reward

# --- Resolving sources into one config --------------------------------------------------------------


class Resolved(BaseModel):
    """A validated config and, for every field, where its value came from."""

    config: TrainConfig
    sources: dict[str, str]
    preset: str
    name: str  # used for the default output_dir


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys without a word; YAML forbids them, and a setting given twice is
    a mistake to point at."""

    def construct_mapping(self, node, deep=False):
        lines = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):  # SafeLoader refuses it below, with its own message
                continue
            if key in lines:
                raise yaml.constructor.ConstructorError(
                    problem=f"{key} is given twice, on lines {lines[key]} and {key_node.start_mark.line + 1}",
                    problem_mark=key_node.start_mark,
                )
            lines[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {path}: not found")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"config file {path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    except UnicodeDecodeError:
        raise UserError(f"config file {path}: not UTF-8 text (a YAML file of field: value lines is expected)") from None
    except OSError as e:
        raise UserError(f"config file {path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path}: expected a mapping of field: value, got {type(data).__name__}")
    if bad := [key for key in data if not isinstance(key, str)]:
        raise UserError(f"config file {path}: {bad[0]!r} is not a setting name (`loratune config show` lists them)")
    return data


PATH_FIELDS = ("train_data", "val_data", "test_data", "chat_template")


def resolve(
    config_file: str | None = None,
    preset: str | None = None,
    flags: dict[str, Any] | None = None,
) -> Resolved:
    """Layer defaults < preset < YAML < flags, validate once, and remember each value's source.

    `flags` maps field names to raw command-line strings (or Python values from the API).
    """
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    file_values: dict[str, Any] = {}
    if config_file:
        file_values = read_yaml(config_file)
        base = Path(config_file).resolve().parent
        # Relative paths in a config file are relative to that file, so configs can travel with their data.
        for key in PATH_FIELDS:
            v = file_values.get(key)
            if isinstance(v, str) and not Path(v).is_absolute() and (base / v).exists():
                file_values[key] = str(base / v)
        if "reward" in file_values:
            file_values["reward"] = _rewards_beside(file_values["reward"], base)

    preset_name = preset or file_values.pop("preset", None) or DEFAULT_PRESET
    file_values.pop("preset", None)
    if preset_name not in PRESETS:
        raise UserError(f"preset = {preset_name!r}: unknown; allowed: {', '.join(PRESETS)}")

    layers = [
        (f"preset {preset_name}", PRESETS[preset_name].values),
        (str(config_file), file_values),
        ("command line", flags),
    ]
    merged: dict[str, Any] = {}
    sources = {name: "default" for name in TrainConfig.model_fields}
    for source, values in layers:
        for key, value in values.items():
            merged[key] = value
            sources[key] = source if source != "command line" else f"--{key.replace('_', '-')}"

    try:
        cfg = TrainConfig(**merged)
    except ValidationError as e:
        raise UserError(_explain(e, merged, sources)) from None

    name = Path(config_file).stem if config_file else preset_name if preset_name != DEFAULT_PRESET else "run"
    if cfg.output_dir is None:
        cfg = cfg.model_copy(update={"output_dir": str(Path("runs") / name)})
        sources["output_dir"] = "derived from the config name"
    _check_paths(cfg, sources)
    _check_reward_files(cfg, sources)
    return Resolved(config=cfg, sources=sources, preset=preset_name, name=name)


def _check_paths(cfg: TrainConfig, sources: dict[str, str]) -> None:
    for key in PATH_FIELDS:
        value = getattr(cfg, key)
        if value is None or Path(value).exists() or key == "chat_template" and "/" not in value and "." not in value:
            continue
        if key != "chat_template" and _looks_like_hub_id(value):
            continue  # a hub dataset, loaded when the network allows
        raise UserError(f"{key} = {value!r} (from {sources[key]}): file not found")


def _rewards_beside(value: Any, base: Path) -> Any:
    """A config file's reward functions, with their files found relative to it (as its data files are)."""
    if not isinstance(value, (str, list)):
        return value  # refused by validation, with the value as written
    specs = [value] if isinstance(value, str) else value
    return [_reward_beside(text, base) if isinstance(text, str) else text for text in specs]


def _reward_beside(text: str, base: Path) -> str:
    try:
        path = parse_reward(text).path
    except ValueError:
        return text  # refused by validation, as written
    if path is None or Path(path).is_absolute() or not (base / path).is_file():
        return text
    return str(base / path) + text.strip()[len(path) :]


def _check_reward_files(cfg: TrainConfig, sources: dict[str, str]) -> None:
    """Each reward function's file exists and defines it, before any model loads."""
    for text in cfg.reward:
        spec = parse_reward(text)
        if spec.path is not None:
            try:
                check_function_file(spec)
            except ValueError as e:
                raise UserError(f"reward = {text!r} (from {sources['reward']}): {e}") from None


def _looks_like_hub_id(value: str) -> bool:
    """org/name, optionally :subset and @split (a split may be sliced: train[:90%])."""
    m = re.fullmatch(r"([\w.-]+/[\w.-]+)(:[\w.-]+)?(@[\w.:%\[\]+-]+)?", value)
    return bool(m) and not Path(m.group(1)).suffix


def _explain(error: ValidationError, values: dict[str, Any], sources: dict[str, str]) -> str:
    """One line: the field, its value, where it came from, and what is allowed."""
    err = error.errors()[0]
    field = str(err["loc"][0]) if err["loc"] else ""
    if err["type"] == "extra_forbidden":
        close = _closest(field, TrainConfig.model_fields)
        hint = f"; did you mean {close}?" if close else ""
        return f"unknown setting {field!r} (from {sources.get(field, 'config')}){hint}"
    if not field:
        return f"config: {err['msg']}"
    value = values.get(field, err.get("input"))
    where = f"{field} = {value!r} (from {sources.get(field, 'config')})"
    if err["type"] == "value_error":  # our own validators say precisely what is wrong
        return f"{where}: {err['ctx']['error']}"
    return f"{where}: must be {allowed(field)}"


def _closest(name: str, choices) -> str | None:
    import difflib

    found = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return found[0] if found else None


def dump_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def read_run_config(run_dir: str | Path) -> TrainConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir}: not a loratune run folder (no config.yaml)")
    return TrainConfig(**yaml.safe_load(path.read_text()))
