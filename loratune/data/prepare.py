"""From the config's data sources to tokenized train / validation sets, with every count the user should see."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

import numpy as np

from ..config import TrainConfig
from ..errors import UserError
from .encode import IGNORE, Encoder
from .formats import Example, RowError, detect_format, to_example
from .load import BadRows, read_rows

# Refuse to train when more than this share of examples would have no target token left.
MAX_EMPTY_SHARE = 0.05


@dataclass
class TokenizedSet:
    """Tokenized examples: ids and labels (IGNORE where no loss) per example, and where each came from."""

    input_ids: list[np.ndarray]
    labels: list[np.ndarray]
    origins: list[str]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(x) for x in self.input_ids], dtype=np.int64)

    @property
    def target_counts(self) -> np.ndarray:
        """Tokens that carry loss, per example (the first token is never predicted)."""
        return np.array([int((y[1:] != IGNORE).sum()) for y in self.labels], dtype=np.int64)


@dataclass
class DataReport:
    """What happened to the rows on the way in; printed at the start of training."""

    data_format: str = ""
    rows: int = 0
    bad_rows: int = 0
    first_bad: str | None = None
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_target: int = 0
    duplicates_train_val: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass
class Prepared:
    train: TokenizedSet
    val: TokenizedSet
    test: list[Example]
    report: DataReport


def read_examples(source: str, cfg: TrainConfig, report: DataReport) -> list[tuple[str, Example]]:
    """Rows of one source as canonical Examples, with bad rows stopped or counted."""
    bad = BadRows(cfg.skip_bad_rows)
    fmt = None if cfg.data_format == "auto" else cfg.data_format
    out = []
    for where, row in read_rows(source, bad):
        if fmt is None:
            try:
                fmt = detect_format(list(row), cfg.columns)
            except RowError as e:
                raise UserError(f"{where}: {e}") from None
        try:
            out.append((where, to_example(row, fmt, cfg.columns)))
        except RowError as e:
            bad(where, str(e))
    report.data_format = report.data_format or fmt or ""
    report.rows += len(out) + bad.count
    report.bad_rows += bad.count
    report.first_bad = report.first_bad or bad.first
    if not out:
        raise UserError(f"{source}: no usable examples" + (f" (first problem: {bad.first})" if bad.first else ""))
    return out


def fit_length(ids: list[int], labels: list[int], answer_start: int, max_length: int, policy: str):
    """Apply the truncation policy to one example; None means it is dropped."""
    if len(ids) <= max_length:
        return ids, labels
    if policy == "drop":
        return None
    if policy == "truncate_end":
        return ids[:max_length], labels[:max_length]
    # truncate_prompt_left: keep the last max_length tokens if the final answer survives whole
    # (its first token must stay predictable, so one token of context before it is kept too).
    cut = len(ids) - max_length
    if answer_start < cut + 1:
        return None
    return ids[cut:], labels[cut:]


def tokenize(examples: list[tuple[str, Example]], encoder: Encoder, cfg: TrainConfig, report: DataReport) -> TokenizedSet:
    ids_out, labels_out, origins = [], [], []
    bad = BadRows(cfg.skip_bad_rows)
    for where, ex in examples:
        try:
            ids, labels, answer_start = encoder.encode(ex)
        except RowError as e:
            bad(where, str(e))
            continue
        windows = _windows(ids, labels, cfg.max_length) if ex.train_all else [(ids, labels)]
        for ids, labels in windows:
            fitted = fit_length(ids, labels, answer_start, cfg.max_length, cfg.truncation)
            if fitted is None:
                report.dropped_too_long += 1
                continue
            report.truncated += len(fitted[0]) < len(ids)
            ids, labels = fitted
            if not any(label != IGNORE for label in labels[1:]):
                report.dropped_no_target += 1
                continue
            ids_out.append(np.asarray(ids, dtype=np.int64))
            labels_out.append(np.asarray(labels, dtype=np.int64))
            origins.append(where)
    report.bad_rows += bad.count
    report.first_bad = report.first_bad or bad.first
    return TokenizedSet(ids_out, labels_out, origins)


def _windows(ids, labels, max_length):
    """Plain text longer than max_length is split into consecutive windows rather than cut off."""
    return [(ids[i : i + max_length], labels[i : i + max_length]) for i in range(0, len(ids), max_length)]


def split_validation(examples: list, ratio: float, seed: int) -> tuple[list, list]:
    """Hold out `ratio` of the examples (at least one) with a fixed seed."""
    if ratio == 0:
        return examples, []
    if len(examples) < 2:
        raise UserError("train_data has a single example: nothing to hold out for validation; add val_data or set val_ratio: 0")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(ratio * len(examples)))
    held = set(order[:n_val])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def _fingerprint(ex: Example) -> str:
    text = repr(ex.messages) if ex.messages is not None else ex.prompt + "\x00" + ex.completion
    return hashlib.sha1(text.encode()).hexdigest()


def prepare(cfg: TrainConfig, encoder: Encoder) -> Prepared:
    if not cfg.train_data:
        raise UserError("train_data is not set: give a data file (--train-data FILE) or run `loratune train` alone for the quickstart")
    report = DataReport()
    train_rows = read_examples(cfg.train_data, cfg, report)
    if cfg.val_data:
        val_rows = read_examples(cfg.val_data, cfg, report)
    else:
        train_rows, val_rows = split_validation(train_rows, cfg.val_ratio, cfg.seed)
    seen = {_fingerprint(ex) for _, ex in train_rows}
    report.duplicates_train_val = sum(_fingerprint(ex) in seen for _, ex in val_rows)

    train = tokenize(train_rows, encoder, cfg, report)
    val = tokenize(val_rows, encoder, cfg, report)
    _refuse_empty_targets(train, report, cfg)
    test = [ex for _, ex in read_examples(cfg.test_data, cfg, DataReport())] if cfg.test_data else []
    return Prepared(train, val, test, report)


def _refuse_empty_targets(train: TokenizedSet, report: DataReport, cfg: TrainConfig) -> None:
    if len(train) == 0:
        raise UserError(
            f"no training example is left after tokenization ({report.dropped_too_long} longer than max_length="
            f"{cfg.max_length}, {report.dropped_no_target} without any answer token)"
        )
    share = report.dropped_no_target / (len(train) + report.dropped_no_target)
    if share > MAX_EMPTY_SHARE:
        raise UserError(
            f"{share:.0%} of the training examples have no answer token to learn from (empty answers, or answers "
            f"cut off by max_length={cfg.max_length} with truncation={cfg.truncation}); check the data's columns "
            "and `loratune data inspect` before training"
        )
