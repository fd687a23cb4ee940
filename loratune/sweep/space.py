"""What a sweep searches: the Training Guide's ranges, or a YAML file naming TrainConfig fields with a range or
choices. Every bound and choice is checked by validating a TrainConfig with it, before anything trains.

A space file:

    learning_rate: {low: 5.0e-5, high: 2.0e-4, log: true}   # a range (log: sampled on a log scale)
    lora_r: {choices: [8, 16, 32]}                           # choices
    lora_alpha: {times_lora_r: [2, 3, 4]}                    # lora_alpha only: a multiple of the trial's lora_r
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..core.config import TrainConfig, allowed
from ..core.errors import UserError

# The Training Guide's recommended ranges (core.presets.guide_warnings checks the same).
GUIDE_SPACE: dict[str, dict] = {
    "learning_rate": {"low": 5e-5, "high": 2e-4, "log": True},
    "lora_r": {"choices": [8, 16, 32]},
    "lora_alpha": {"times_lora_r": [2, 3, 4]},
    "warmup_ratio": {"low": 0.03, "high": 0.1},
    "lora_dropout": {"low": 0.0, "high": 0.1},
}

# Fields a sweep never searches, and why.
NOT_SEARCHED = {
    "batch_size": "it comes from the config (the effective batch is not searched)",
    "gradient_accumulation_steps": "it comes from the config (the effective batch is not searched)",
    "epochs": "each trial trains up to the config's epochs, with early stopping on validation loss",
    "output_dir": "each trial has its own folder in the sweep folder",
}
ENTRY_KEYS = ("low", "high", "log", "choices", "times_lora_r")
ALPHA_PARAM = "lora_alpha/lora_r"  # the study's name for the multiplier


@dataclass(frozen=True)
class Dim:
    """One searched field: a range (low, high, log) or choices; with `times_lora_r` the choices multiply lora_r."""

    field: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple = ()
    times_lora_r: bool = False

    @property
    def param(self) -> str:
        return ALPHA_PARAM if self.times_lora_r else self.field

    def entry(self) -> dict:
        """The space file entry (validated values): what the study stores and compares on continuing."""
        if self.times_lora_r:
            return {"times_lora_r": list(self.choices)}
        if self.choices:
            return {"choices": list(self.choices)}
        return {"low": self.low, "high": self.high} | ({"log": True} if self.log else {})

    def text(self) -> str:
        if self.times_lora_r:
            return f"{self.field}: lora_r x one of {', '.join(map(str, self.choices))}"
        if self.choices:
            return f"{self.field}: one of {', '.join(map(str, self.choices))}"
        return f"{self.field}: {self.low:g} to {self.high:g}" + (" (log scale)" if self.log else "")


@dataclass(frozen=True)
class Space:
    dims: tuple[Dim, ...]

    def to_json(self) -> dict:
        return {d.field: d.entry() for d in self.dims}

    def largest(self) -> dict[str, Any]:
        """The largest value of each numeric field: where a trial needs the most memory and time."""
        out = {}
        for d in self.dims:
            numbers = [c for c in d.choices if isinstance(c, int | float) and not isinstance(c, bool)]
            if d.high is not None or (numbers and not d.times_lora_r):
                out[d.field] = d.high if d.high is not None else max(numbers)
        return out


def load_space(spec: str, base: TrainConfig) -> Space:
    """`guide` or a YAML file, checked against `base` (the sweep's config)."""
    if spec == "guide":
        return parse_space(GUIDE_SPACE, base, "the Guide's space")
    path = Path(spec)
    where = f"space file {spec}"
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{where}: not found (give a YAML file, or --space guide)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{where}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{where}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{where}: expected a mapping of setting: {{low, high}} or {{choices}}, got {raw!r:.60}")
    return parse_space(raw, base, where)


def parse_space(raw: dict, base: TrainConfig, where: str) -> Space:
    return Space(tuple(_dim(str(field), entry, base, where) for field, entry in raw.items()))


def _dim(field: str, entry, base: TrainConfig, where: str) -> Dim:
    if field not in TrainConfig.model_fields:
        close = difflib.get_close_matches(field, list(TrainConfig.model_fields), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else " (`loratune train --help` lists the settings)"
        raise UserError(f"{where}: {field!r} is not a setting{hint}")
    if field in NOT_SEARCHED:
        raise UserError(f"{where}: {field} cannot be searched: {NOT_SEARCHED[field]}")
    forms = "low/high (and log: true) or choices" + (" or times_lora_r" if field == "lora_alpha" else "")
    if not isinstance(entry, dict) or set(entry) - set(ENTRY_KEYS):
        raise UserError(f"{where}: {field}: expected {forms}, got {entry!r:.60}")
    given = [k for k in ("choices", "times_lora_r") if k in entry] + (["range"] if {"low", "high"} & set(entry) else [])
    if len(given) != 1 or ("log" in entry and given != ["range"]):
        raise UserError(f"{where}: {field}: give one of {forms}")
    if given == ["times_lora_r"]:
        return _times(field, entry["times_lora_r"], base, where)
    if given == ["choices"]:
        return _choices(field, entry["choices"], base, where)
    return _range(field, entry, base, where)


def _range(field: str, entry: dict, base: TrainConfig, where: str) -> Dim:
    if "low" not in entry or "high" not in entry:
        raise UserError(f"{where}: {field}: a range needs both low and high")
    low, high = (_checked(field, key, entry[key], base, where) for key in ("low", "high"))
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (low, high)):
        raise UserError(f"{where}: {field} is {allowed(field)}, not a number: give choices instead of low/high")
    log = entry.get("log", False)
    if not isinstance(log, bool):
        raise UserError(f"{where}: {field}: log is true or false, got {log!r}")
    if not low < high:
        raise UserError(f"{where}: {field}: low {low!r} must be below high {high!r} (for one value, leave it out)")
    if log and low <= 0:
        raise UserError(f"{where}: {field}: a log-scale range needs low above 0, got {low!r}")
    return Dim(field, low, high, log)


def _choices(field: str, choices, base: TrainConfig, where: str) -> Dim:
    if not isinstance(choices, list) or not choices:
        raise UserError(f"{where}: {field}: choices must be a non-empty list, got {choices!r:.60}")
    flat = []
    for choice in choices:
        if isinstance(choice, list) and all(isinstance(c, str) for c in choice):
            choice = ",".join(choice)  # how a list is given as a flag, which the trial's command line does
        if not isinstance(choice, bool | int | float | str):
            raise UserError(
                f"{where}: {field}: choice {choice!r:.60} is not a number, text, true/false or a list of names"
            )
        value = _checked(field, "choice", choice, base, where)
        flat.append(value if isinstance(value, bool | int | float | str) else choice)  # 5e-5 as a number
    return Dim(field, choices=tuple(flat))


def _times(field: str, factors, base: TrainConfig, where: str) -> Dim:
    if field != "lora_alpha":
        raise UserError(f"{where}: {field}: times_lora_r is for lora_alpha only")
    whole = (
        isinstance(factors, list) and factors and all(isinstance(f, int) and not isinstance(f, bool) for f in factors)
    )
    if not whole or min(factors) <= 0:
        raise UserError(f"{where}: lora_alpha: times_lora_r must be whole numbers above 0 such as [2, 3, 4]")
    return Dim(field, choices=tuple(factors), times_lora_r=True)


def _checked(field: str, label: str, value, base: TrainConfig, where: str):
    """The value as TrainConfig reads it, or one line saying it is outside what the field allows."""
    try:
        cfg = TrainConfig.model_validate({**base.model_dump(), field: value})
    except ValidationError as e:
        err, given = e.errors()[0], f"{where}: {field} {label} {value!r}"
        other = str(err["loc"][0]) if err["loc"] else ""
        if other and other != field:  # a rule between settings, e.g. an objective's own settings
            raise UserError(f"{given} does not go with the config's {other}: {err['msg']}") from None
        if err["type"] == "value_error":  # TrainConfig's own validators say precisely what is wrong
            raise UserError(f"{given}: {err['ctx']['error']}") from None
        raise UserError(f"{given} is outside what {field} allows ({allowed(field)})") from None
    return getattr(cfg, field)


def suggest(trial, space: Space, base: TrainConfig) -> dict[str, Any]:
    """The trial's values of the searched fields (lora_alpha from its multiplier and the trial's lora_r)."""
    values: dict[str, Any] = {}
    for d in space.dims:
        if d.choices and not d.times_lora_r:
            values[d.field] = trial.suggest_categorical(d.param, list(d.choices))
        elif not d.choices:
            suggest_number = trial.suggest_int if isinstance(d.low, int) else trial.suggest_float
            values[d.field] = suggest_number(d.param, d.low, d.high, log=d.log)
    for d in space.dims:
        if d.times_lora_r:
            values[d.field] = trial.suggest_categorical(d.param, list(d.choices)) * values.get("lora_r", base.lora_r)
    return values


def as_flags(values: dict[str, Any]) -> list[str]:
    """The values as `loratune train` flags (`--name=value`: a value may start with a dash)."""

    def text(v) -> str:
        return ("true" if v else "false") if isinstance(v, bool) else repr(v) if isinstance(v, float) else str(v)

    return [f"--{field.replace('_', '-')}={text(v)}" for field, v in values.items()]
