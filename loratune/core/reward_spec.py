"""The text of one GRPO reward, as the `reward` setting gives it: `NAME[:ARGUMENT][=WEIGHT]` for a built-in reward,
`path/to/file.py:function[=WEIGHT]` for the user's own. Parsed and checked here, at config time, without running
any of the user's code; data.rewards turns specs into the functions a run calls.

The same text serves flags, YAML and the run's config.yaml, so there is one syntax to learn and to show. The weight
is what follows the last `=` when that is a number: a regex pattern may itself hold `=`, and one that ends in
`=NUMBER` needs its weight written out (`regex:a=1=1`).
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass
from pathlib import Path

# Built-in rewards and what their argument is (None: they take none).
BUILT_IN = {"exact": None, "regex": "PATTERN", "json": None, "length": "N"}
ALLOWED = "exact, regex:PATTERN, json, length:N, or path/to/file.py:function, each optionally =WEIGHT"
_USER = re.compile(r"(?P<path>.+\.py):(?P<function>[A-Za-z_]\w*)(?:=(?P<weight>.*))?", re.DOTALL)


@dataclass(frozen=True)
class RewardSpec:
    """One reward: a built-in `name` with its `argument` (pattern or token count), or the user's function (named by
    `argument`) in `path`."""

    name: str  # a built-in's name, or "function" for the user's own
    argument: str | None
    weight: float
    path: str | None = None

    @property
    def metric_name(self) -> str:
        """A word, as trackers take it in a metric's name (MLflow refuses a pattern's characters)."""
        return self.argument if self.path is not None else self.name

    @property
    def label(self) -> str:
        """How messages name it: its text without the weight (a user file without its folder)."""
        if self.path is not None:
            return f"{Path(self.path).name}:{self.argument}"
        return self.name if self.argument is None else f"{self.name}:{self.argument}"


def parse_reward(text: str) -> RewardSpec:
    """The spec a reward's text gives; ValueError saying what is wrong and what is allowed."""
    text = text.strip()
    if m := _USER.fullmatch(text):
        weight = 1.0 if m["weight"] is None else _weight(m["weight"], text)
        return RewardSpec("function", m["function"], weight, m["path"])
    body, sep, tail = text.rpartition("=")
    if not sep or (_number(tail) is None and text.startswith("regex:")):
        body, tail = text, None
    name, colon, argument = body.partition(":")
    if name not in BUILT_IN:
        raise ValueError(f"{text!r}: unknown reward; allowed: {ALLOWED}")
    weight = 1.0 if tail is None else _weight(tail, text)
    return RewardSpec(name, _argument(name, argument if colon else None, text), weight)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _weight(text: str, spec: str) -> float:
    value = _number(text)
    if value is None or not math.isfinite(value):
        raise ValueError(f"{spec!r}: the weight {text!r} is not a finite number")
    return value


def _argument(name: str, argument: str | None, text: str) -> str | None:
    wanted = BUILT_IN[name]
    if wanted is None and argument is not None:
        raise ValueError(f"{text!r}: {name} takes no argument; write {name} or {name}=WEIGHT")
    if wanted is not None and not argument:
        raise ValueError(f"{text!r}: {name} needs its {wanted}: {name}:{wanted}[=WEIGHT]")
    if name == "regex":
        try:
            re.compile(argument)
        except re.error as e:
            raise ValueError(f"{text!r}: not a valid regular expression ({e})") from None
    if name == "length" and not (argument.isdigit() and int(argument) > 0):
        raise ValueError(f"{text!r}: N must be a whole number of tokens above 0, e.g. length:200")
    return argument


def check_function_file(spec: RewardSpec) -> None:
    """The user's file exists, is Python, and defines the function at its top level (read, not run: checking a config
    runs none of the user's code). ValueError saying which."""
    path = Path(spec.path)
    if not path.is_file():
        raise ValueError(f"{spec.path}: file not found")
    try:
        tree = ast.parse(path.read_bytes(), filename=spec.path)
    except SyntaxError as e:
        raise ValueError(f"{spec.path} line {e.lineno}: not valid Python ({e.msg})") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{spec.path}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
    names = _top_level_names(tree)
    if spec.argument not in names and "*" not in names:  # a star import may bring it
        raise ValueError(f"{spec.path} defines no function {spec.argument!r} at its top level")


def _top_level_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update("*" if a.name == "*" else (a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
    return names
