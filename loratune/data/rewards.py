"""GRPO's rewards: the `reward` setting's specs (core.reward_spec) as functions that score a batch of completions.

A completion is the generated text up to, not including, the chat template's end-of-turn token; `columns` holds
each extra column of the rows, `reference` (the answer of an SFT-shaped row) included, one entry per completion.
Every function's output is checked: a reward that raises, or returns anything but one finite number per
completion, stops the run with a `RewardError` naming the reward and the first example it failed on.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Real
from pathlib import Path

import numpy as np

from ..core.errors import UserError, first_line
from ..core.reward_spec import RewardSpec, check_function_file, parse_reward
from .scores import exact_match, field_accuracy

# (prompts, completions, columns, completion_tokens) -> one number per completion
Score = Callable[[list[str], list[str], dict[str, list], list[int]], object]


class RewardError(UserError):
    """A reward function failed, or returned what is not one finite number per completion (one line: the reward, the
    first bad example's index and the start of its prompt)."""


@dataclass(frozen=True)
class Reward:
    name: str  # in metrics
    label: str  # in messages
    weight: float
    score: Score


class Rewards:
    """The run's rewards: called on a batch, the weighted total per completion and each reward's own scores."""

    def __init__(self, rewards: list[Reward]):
        self._rewards = tuple(rewards)
        self.names = tuple(r.name for r in rewards)

    def __call__(
        self, prompts: list[str], completions: list[str], columns: dict[str, list], completion_tokens: list[int]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        n = len(completions)
        if len(prompts) != n or len(completion_tokens) != n or any(len(v) != n for v in columns.values()):
            raise ValueError("rewards: prompts, columns and token counts must have one entry per completion")
        batch = (prompts, completions, columns, completion_tokens)
        scores = {r.name: _checked(r, batch) for r in self._rewards}
        total = np.zeros(n, dtype=np.float64)
        for r in self._rewards:
            total += r.weight * scores[r.name]
        return total, scores


def rewards_for(cfg) -> Rewards:
    """The rewards `cfg.reward` names, the user's functions imported (RewardError where one cannot be)."""
    specs = [parse_reward(text) for text in cfg.reward]
    return Rewards([_reward(spec, name) for spec, name in zip(specs, _names(specs))])


def _names(specs: list[RewardSpec]) -> list[str]:
    """Each reward's name in metrics: the built-in's or the function's, with _2, _3 for a second and third."""
    names: list[str] = []
    for spec in specs:
        name, k = spec.metric_name, 1
        while name in names:
            k += 1
            name = f"{spec.metric_name}_{k}"
        names.append(name)
    return names


def check_rewards(rewards: Rewards, prompts: list[str], columns: dict[str, list]) -> dict[str, float]:
    """Score each row's reference as its completion (with 0 tokens; an empty completion where a row has none), before
    a model is loaded: a reward that fails on the data, or needs a column it lacks, stops the run now rather than
    after the first generation. Returns each reward's mean score of the references."""
    references = columns.get("reference") or [None] * len(prompts)
    completions = ["" if r is None else str(r) for r in references]
    _, scores = rewards(prompts, completions, columns, [0] * len(prompts))
    return {name: float(s.mean()) for name, s in scores.items()}


# --- Checking what a reward returns ----------------------------------------------------------------------


def _example(prompts: list[str], i: int) -> str:
    text = " ".join(str(prompts[i]).split())
    return f"example {i} (prompt {text[:40] + '…' if len(text) > 40 else text!r})"


def _checked(reward: Reward, batch: tuple) -> np.ndarray:
    prompts, n = batch[0], len(batch[1])
    try:
        out = reward.score(*batch)
    except RewardError:
        raise
    except Exception as e:
        where = _first_failing(reward, batch)
        where = f"on {_example(prompts, where)}" if where is not None else f"on the batch of {n} (on none alone)"
        raise RewardError(f"reward {reward.label} raised {type(e).__name__}: {first_line(e)}, {where}") from None
    values = out.tolist() if hasattr(out, "tolist") else out  # a NumPy array or a tensor
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise RewardError(f"reward {reward.label} returned {_short(out)}: expected a list of one number per completion")
    if len(values) != n:
        raise RewardError(f"reward {reward.label} returned {len(values)} scores for {n} completions: expected one each")
    for i, v in enumerate(values):
        if not isinstance(v, Real) or not math.isfinite(v):
            bad = f"reward {reward.label} returned {_short(v)} for {_example(prompts, i)}"
            raise RewardError(f"{bad}: a reward must be a finite number")
    return np.asarray(values, dtype=np.float64)


def _short(value) -> str:
    text = repr(value)
    return text[:40] + "…" if len(text) > 40 else text


def _first_failing(reward: Reward, batch: tuple) -> int | None:
    """The first example the reward raises on alone: a batch's exception does not say which example caused it."""
    prompts, completions, columns, tokens = batch
    for i in range(len(completions)):
        one = slice(i, i + 1)
        try:
            reward.score(prompts[one], completions[one], {k: v[one] for k, v in columns.items()}, tokens[one])
        except Exception:
            return i
    return None


# --- The rewards -------------------------------------------------------------------------------------------


def _reward(spec: RewardSpec, name: str) -> Reward:
    if spec.path is not None:
        return Reward(name, spec.label, spec.weight, _user_score(_load(spec)))
    each = {
        "exact": lambda argument: _exact,
        "regex": _regex,
        "json": lambda argument: _json,
        "length": lambda argument: _length(int(argument)),
    }[spec.name](spec.argument)
    return Reward(name, spec.label, spec.weight, _per_example(spec.name, each))


def _per_example(name: str, each: Callable[[str, object, int], float]) -> Score:
    """A batch score from a score of one completion, its reference and its token count; `exact` needs the reference."""

    def score(prompts, completions, columns, tokens):
        references = columns.get("reference", [None] * len(completions))
        if name == "exact" and None in references:
            i = references.index(None)
            raise RewardError(
                f"reward exact: {_example(prompts, i)} has no reference to compare with (give the rows an answer "
                "column or a `reference` column, or choose another reward)"
            )
        return [each(c, ref, t) for c, ref, t in zip(completions, references, tokens)]

    return score


def _exact(completion: str, reference, tokens: int) -> float:
    return float(exact_match(completion, str(reference)))


def _regex(pattern: str) -> Callable[[str, object, int], float]:
    compiled = re.compile(pattern)
    return lambda completion, reference, tokens: float(compiled.search(completion) is not None)


def _json(completion: str, reference, tokens: int) -> float:
    """0 for text that is not JSON; for JSON, the share of a JSON-object reference's fields it got right (the eval's
    field accuracy: top-level fields, a nested value right only if equal as a whole), or 1 without one."""
    try:
        json.loads(completion)
    except ValueError:
        return 0.0
    fields = field_accuracy(completion, reference) if isinstance(reference, str) else None
    return 1.0 if fields is None else fields


def _length(limit: int) -> Callable[[str, object, int], float]:
    """0 up to `limit` tokens, then -1/limit per token beyond it, down to -1 at twice the limit."""
    return lambda completion, reference, tokens: max(-1.0, min(0.0, (limit - tokens) / limit))


def _user_score(function: Callable) -> Score:
    """TRL's calling convention: keywords, so a function written for TRL (`f(completions, **kwargs)`) works here."""

    def score(prompts, completions, columns, tokens):
        # copies: a function that changes its arguments must not change the run's data
        extra = {k: list(v) for k, v in columns.items()}
        return function(prompts=list(prompts), completions=list(completions), **extra)

    return score


def _load(spec: RewardSpec) -> Callable:
    """Import the user's file (its folder on the import path while it loads, as `python file.py` would have it)."""
    try:
        check_function_file(spec)
    except ValueError as e:
        raise RewardError(f"reward {spec.label}: {e}") from None
    path = Path(spec.path).resolve()
    name = f"loratune_reward:{path}"
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(name, path))
    sys.modules[name] = module  # where dataclasses and pickle look a module's classes up
    sys.path.insert(0, str(path.parent))
    try:
        module.__spec__.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        message = f"importing {spec.path} failed: {type(e).__name__}: {first_line(e)}"
        raise RewardError(f"reward {spec.label}: {message}") from None
    finally:
        sys.path.remove(str(path.parent))
    function = getattr(module, spec.argument, None)
    if not callable(function):
        raise RewardError(f"reward {spec.label}: {spec.argument} in {spec.path} is not a function")
    return function
