"""GRPO's rows -> prompts as token ids, with the columns reward functions read.

A row is a prompt to sample answers for:

- `prompt`: text (raw, as SFT's `prompt_completion` shape: no chat template), or a list of turns ending with a
  user or system turn (rendered by the chat template with its generation prompt);
- any SFT shape with an answer (`input`/`output`, `instruction`/`output`, `prompt`/`completion`, `messages`, ...):
  the prompt is what generation is given before the last answer (`Encoder.prompt_ids`), and the answer becomes the
  row's `reference`.

Every other column of the row is kept and handed to the reward functions by name (as TRL does), `reference`
included. The prompt's tokens are exactly those SFT's generation gives the model.

`max_length` bounds the prompt and `max_new_tokens` together: a longer prompt is cut from the left (its end, which
the answer follows, stays) and counted as truncated, as preference prompts are; nothing is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..core.errors import UserError
from .encode import Encoder
from .formats import SHAPES, Example, RowError, detect_format, prompt_messages, prompt_text, to_example
from .load import BadRows, open_source
from .prepare import DataReport, Fit, Prepared, read_examples, split_validation
from .rewards import check_rewards, rewards_for

CHECKED_ROWS = 16  # rows whose references the rewards score before any model loads


@dataclass
class PromptRow:
    """One prompt: its token ids, its text as reward functions see it, and the row's other columns."""

    ids: list[int]
    text: str
    columns: dict
    origin: str


class PromptSet:
    """Prompts as a run's examples. `StepPlan` sees each as the longest sequence it can become (prompt +
    max_new_tokens) with max_new_tokens targets: the passes are sized for the longest answers."""

    def __init__(self, items: list[PromptRow], max_new_tokens: int):
        self.items, self.max_new_tokens = items, max_new_tokens
        self.lengths = np.array([len(item.ids) + max_new_tokens for item in items], dtype=np.int64)
        self.target_counts = np.full(len(items), max_new_tokens, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def origins(self) -> list[str]:
        return [item.origin for item in self.items]

    def select(self, indices) -> PromptSet:
        return PromptSet([self.items[i] for i in indices], self.max_new_tokens)

    def columns(self, examples, repeat: int = 1) -> dict[str, list]:
        """The extra columns of these rows, each value repeated `repeat` times (once per sampled answer); a column
        some rows lack is None there."""
        names = dict.fromkeys(name for i in examples for name in self.items[i].columns)
        return {name: [self.items[i].columns.get(name) for i in examples for _ in range(repeat)] for name in names}


def read_prompts(spec: str, cfg, encoder: Encoder, split: str = "train") -> tuple[list[PromptRow], int, BadRows]:
    """Every row of a source as a prompt (full length), the rows read, and the bad rows counted."""
    source, bad = open_source(spec, split), BadRows(cfg.skip_bad_rows)
    items, rows, fmt = [], 0, None
    for where, row in source.rows(bad):
        if fmt is None:
            fmt = _shape(list(row), cfg.columns, where)
        rows += 1
        try:
            items.append(_prompt_row(row, fmt, cfg.columns, encoder, where))
        except RowError as e:
            bad(where, str(e))
    if not rows and not bad.count:
        raise UserError(f"{source.name}: no rows (the file or folder is empty)")
    if not items:
        raise UserError(f"{source.name}: no usable prompts (first problem: {bad.first})")
    return items, rows, bad


def _shape(columns: list[str], mapping: dict[str, str], where: str) -> str:
    """`prompt` when the rows carry one, else the SFT shape whose answer becomes the reference."""
    if mapping.get("prompt", "prompt") in columns and mapping.get("completion", "completion") not in columns:
        return "prompt"
    try:
        fmt = detect_format(columns, mapping)
    except RowError:
        fmt = "text"
    if fmt == "text":  # plain text has no prompt to answer
        raise UserError(
            f"{where}: no prompts: columns {sorted(columns)}; grpo needs a 'prompt' column (text or a list of turns) "
            f"or rows of an SFT shape with an answer ({', '.join(s for s in SHAPES if s != 'text')})"
        )
    return fmt


def _prompt_row(row: dict, fmt: str, mapping: dict[str, str], encoder: Encoder, where: str) -> PromptRow:
    if fmt == "prompt":
        name = mapping.get("prompt", "prompt")
        value = row.get(name)
        if isinstance(value, str) and value.strip():
            example = Example(prompt=value)
        elif isinstance(value, list):
            example = Example(messages=prompt_messages(value, name))
        else:
            raise RowError(f"field {name!r} must be non-empty text or a list of turns, got {value!r:.40}")
        extra = {k: v for k, v in row.items() if k != name}
    else:
        example = to_example(row, fmt, mapping)
        used = {mapping.get(role, role) for role in (*SHAPES[fmt], "system")}
        extra = {k: v for k, v in row.items() if k not in used} | {"reference": encoder.reference(example)}
    ids = encoder.prompt_ids(example)
    if not ids:
        raise RowError("the prompt is empty: the answer's first token would follow nothing")
    return PromptRow(ids, prompt_text(example), extra, where)


def fit_prompts(items: list[PromptRow], room: int) -> tuple[list[PromptRow], Fit]:
    """Prompts cut from the left to `room` tokens, and how many were."""
    fit = Fit()
    fit.truncated = sum(len(item.ids) > room for item in items)
    return [replace(item, ids=item.ids[-room:]) for item in items], fit


def prepare_prompts(cfg, encoder: Encoder) -> Prepared:
    """`data.prepare` for grpo: the train and validation prompts as `PromptSet`s, with the report."""
    if not cfg.train_data:
        raise UserError("train_data is not set: give a file of prompts (--train-data FILE)")
    room = cfg.max_length - cfg.max_new_tokens
    if room < 1:
        raise UserError(
            f"max_length={cfg.max_length} leaves no room for a prompt before max_new_tokens={cfg.max_new_tokens} "
            "answer tokens: raise max_length or lower max_new_tokens"
        )
    report = DataReport(max_length=cfg.max_length, truncation="truncate_prompt_left", unit="prompts")
    sets = []
    for spec, split in ((cfg.train_data, "train"), (cfg.val_data, "validation")):
        if spec:
            items, rows, bad = read_prompts(spec, cfg, encoder, split)
            report.rows += rows
            report.bad_rows += bad.count
            report.first_bad = report.first_bad or bad.first
            sets.append(fit_prompts(items, room))
    (train, report.train_fit), val_fit = sets[0], sets[1:]
    train = PromptSet(train, cfg.max_new_tokens)
    if val_fit:
        val, report.val_fit = PromptSet(val_fit[0][0], cfg.max_new_tokens), val_fit[0][1]
    else:
        train, val = split_validation(train, cfg.val_ratio, cfg.seed)
    first = range(min(len(train), CHECKED_ROWS))
    check_rewards(rewards_for(cfg), [train.items[i].text for i in first], train.columns(first))
    report.data_format = "prompts"
    report.train_examples, report.val_examples = len(train), len(val)
    test = read_examples(cfg.test_data, "test", cfg) if cfg.test_data else []
    return Prepared(train, val, test, report)
