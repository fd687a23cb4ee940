"""From the config's data sources to tokenized train / validation sets, with every count the user should see.

    source -> rows -> Examples -> tokens (cached) -> validation split -> max_length policy -> report

Each source's full-length tokens are cached as an Arrow dataset under the loratune cache, keyed by the source's
content, the tokenizer and template, and the settings that change tokens. A second run (or `data inspect`, or a
run with another max_length) memory-maps them instead of tokenizing again.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from ..core.cache import cache_dir
from ..core.config import TrainConfig
from ..core.errors import UserError
from ..core.files import atomic_dir
from .encode import IGNORE, Encoder, SplitCount
from .formats import Example, RowError, check_columns, check_mapping, detect_format, require_answers, to_example
from .load import BadRows, open_source

# Refuse to train when more than this share of examples would have no target token left.
MAX_EMPTY_SHARE = 0.05
# Part of every cache key: bump when the cached content or its layout changes.
CACHE_VERSION = 2  # 2: one Arrow IPC file, read with pyarrow alone (importing datasets costs every run)
TOKENS = "tokens.arrow"


@dataclass
class TokenizedSet:
    """Tokenized examples: ids and labels (IGNORE where no loss) per example, and where each came from."""

    input_ids: list[np.ndarray]
    labels: list[np.ndarray]
    origins: list[str]
    answer_starts: np.ndarray | None = None  # where each last answer starts; kept before max_length is applied

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(x) for x in self.input_ids], dtype=np.int64)

    @property
    def target_counts(self) -> np.ndarray:
        """Tokens that carry loss, per example (the first token is never predicted)."""
        return np.array([int((y[1:] != IGNORE).sum()) for y in self.labels], dtype=np.int64)

    def select(self, indices) -> TokenizedSet:
        starts = None if self.answer_starts is None else self.answer_starts[np.asarray(indices, dtype=np.int64)]
        return TokenizedSet(
            [self.input_ids[i] for i in indices],
            [self.labels[i] for i in indices],
            [self.origins[i] for i in indices],
            starts,
        )


@dataclass
class Fit:
    """What max_length did to one set of examples."""

    truncated: int = 0
    windows: int = 0  # windows added by splitting long plain text
    dropped_too_long: int = 0
    dropped_no_target: int = 0
    first_too_long: str | None = None
    first_no_target: str | None = None


@dataclass
class DataReport:
    """What happened to the rows on the way in; printed at the start of training."""

    data_format: str = ""
    rows: int = 0
    bad_rows: int = 0
    first_bad: str | None = None
    duplicates_train_val: int = 0
    duplicates_train: int = 0
    from_cache: bool = False  # every source's tokens came from the cache
    train_examples: int = 0  # after max_length
    val_examples: int = 0
    max_length: int = 0
    truncation: str = ""
    recommended_max_length: int | None = None  # keeps 99% of examples whole; None for plain text
    train_fit: Fit = field(default_factory=Fit)
    val_fit: Fit = field(default_factory=Fit)
    # Conversations trained as several sequences, the sequences, their extra tokens, all tokens (encode.SplitCount).
    split_rows: int = 0
    split_sequences: int = 0
    split_extra_tokens: int = 0
    tokens: int = 0
    notes: list[str] = field(default_factory=list)
    unit: str = "examples"  # what a run's examples are: pairs (DPO, ORPO, SimPO), rows (KTO)
    # Preference data: the SFT shape its prompts were formatted as (prompt_completion: raw text, messages: the chat
    # template), which generation, chat and export format prompts as.
    prompt_format: str = ""

    @property
    def truncated(self) -> int:
        return self.train_fit.truncated + self.val_fit.truncated

    @property
    def dropped_too_long(self) -> int:
        return self.train_fit.dropped_too_long + self.val_fit.dropped_too_long

    @property
    def dropped_no_target(self) -> int:
        return self.train_fit.dropped_no_target + self.val_fit.dropped_no_target

    def split_line(self) -> str:
        return SplitCount(self.split_rows, self.split_sequences, self.split_extra_tokens, self.tokens).line()

    def lines(self) -> list[tuple[bool, str]]:
        """(is_warning, message) for the console at the start of training."""
        cache = "; tokens from cache" if self.from_cache else ""
        counts = f"{self.train_examples} training, {self.val_examples} validation {self.unit}"
        out = [(False, f"data: {self.rows} rows ({self.data_format}): {counts}{cache}")]
        out += [line for line in self._fit_lines() if line[1]]
        if self.duplicates_train:
            out.append((False, f"{self.duplicates_train} training examples are exact repeats of another"))
        if self.split_rows:
            out.append((False, self.split_line()))
        return out + [(False, note) for note in self.notes]

    def _fit_lines(self) -> list[tuple[bool, str]]:
        """What reading and fitting the rows to max_length did (an empty message where there is nothing to say)."""
        n, train, val = self.max_length, self.train_fit, self.val_fit
        hint = (
            f"; max_length={self.recommended_max_length} keeps 99% whole (loratune data inspect)"
            if self.recommended_max_length and self.recommended_max_length > n
            else ""
        )
        no_val = val.dropped_too_long + val.dropped_no_target and not self.val_examples
        return [
            (True, self.bad_rows and f"{self.bad_rows} malformed rows skipped; first: {self.first_bad}"),
            (False, self.truncated and f"{self.truncated} {self.unit} longer than max_length={n} were truncated "
                f"({self.truncation}){hint}"),
            (False, (train.windows + val.windows) and f"long texts were split into {train.windows + val.windows} "
                f"extra windows of max_length={n}"),
            (True, self.dropped_too_long and f"{self.dropped_too_long} {self.unit} longer than max_length={n} were "
                f"dropped (truncation={self.truncation}; first: {train.first_too_long or val.first_too_long}){hint}"),
            (True, self.dropped_no_target and f"{self.dropped_no_target} examples had no answer token left after "
                f"truncation={self.truncation} at max_length={n} and were dropped (first: "
                f"{train.first_no_target or val.first_no_target})"),
            (True, no_val and f"no validation example fits max_length={n}: validation loss (and early stopping) "
                "cannot be measured"),
            (True, self.duplicates_train_val and f"{self.duplicates_train_val} validation examples also appear in "
                "the training data, so validation loss will look better than it is"),
        ]  # fmt: skip


@dataclass
class Prepared:
    train: TokenizedSet
    val: TokenizedSet
    test: list[Example]
    report: DataReport


# --- Rows -> Examples -----------------------------------------------------------------------------------------


def _examples(source, cfg: TrainConfig, bad: BadRows) -> Iterator[tuple[str, Example, str]]:
    """The source's rows as (origin, Example, shape); the shape is detected (or checked) on the first row."""
    fmt = None if cfg.data_format == "auto" else cfg.data_format
    rows = 0
    for where, row in source.rows(bad):
        try:
            if rows == 0:
                if fmt is None:
                    fmt = detect_format(list(row), cfg.columns)
                else:
                    check_columns(list(row), fmt, cfg.columns)
                check_mapping(list(row), cfg.columns, fmt)
        except RowError as e:
            raise UserError(f"{where}: {e}") from None
        rows += 1
        try:
            example = to_example(row, fmt, cfg.columns)
            require_answers(example, fmt, cfg.columns)
        except RowError as e:
            bad(where, str(e))
            continue
        yield where, example, fmt
    if rows == 0 and not bad.count:
        raise UserError(f"{source.name}: no rows (the file or folder is empty)")


def _no_usable(name: str, bad: BadRows) -> UserError:
    return UserError(f"{name}: no usable examples (first problem: {bad.first})")


def read_examples(spec: str, split: str, cfg: TrainConfig) -> list[Example]:
    """The Examples of a source, untokenized (for generation on held-out test data)."""
    bad = BadRows(cfg.skip_bad_rows)
    out = [ex for _, ex, _ in _examples(open_source(spec, split), cfg, bad)]
    if not out:
        raise _no_usable(spec, bad)
    return out


# --- Examples -> tokens, cached per source --------------------------------------------------------------------


def encode_source(
    spec: str, split: str, cfg: TrainConfig, encoder: Encoder, report: DataReport
) -> tuple[TokenizedSet, bool]:
    """Full-length tokens of one source, and whether they came from the cache (tokenized the same way before)."""
    source = open_source(spec, split)
    settings = [CACHE_VERSION, source.digest(), encoder.fingerprint(), cfg.data_format, cfg.columns, cfg.skip_bad_rows]
    folder = cache_dir() / "data" / hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:32]
    cached = _load(folder)
    if cached is not None:
        data, meta = cached
    else:
        data, meta = _encode(source, cfg, encoder)
        if not folder.exists():  # another process may have written it meanwhile
            try:
                _save(folder, data, meta)
            except (UserError, OSError) as e:  # a cache that cannot be written only costs the next run its time
                report.notes.append(f"tokens not cached: {e}")
    report.data_format = report.data_format or meta["data_format"]
    report.rows += meta["rows"]
    report.bad_rows += meta["bad_rows"]
    report.first_bad = report.first_bad or meta["first_bad"]
    split = SplitCount(**meta.get("split", {}))
    report.split_rows += split.rows
    report.split_sequences += split.sequences
    report.split_extra_tokens += split.extra_tokens
    report.tokens += split.tokens
    return data, cached is not None


def _encode(source, cfg: TrainConfig, encoder: Encoder) -> tuple[TokenizedSet, dict]:
    bad = BadRows(cfg.skip_bad_rows)
    ids_out, labels_out, starts, origins = [], [], [], []
    fmt, encoded, split = None, 0, SplitCount()
    for where, example, fmt in _examples(source, cfg, bad):  # noqa: B007 (the shape, read after the loop)
        try:
            sequences = encoder.encode(example)
        except RowError as e:
            bad(where, str(e))
            continue
        encoded += 1
        split.add(sequences)
        for seq in sequences:  # one per answer group: the sequences of a row share its origin
            ids_out.append(np.asarray(seq.ids, dtype=np.int64))
            labels_out.append(np.asarray(seq.labels, dtype=np.int64))
            starts.append(seq.answer_start)
            origins.append(where)
    if not ids_out:
        raise _no_usable(source.name, bad)
    # Every row was either encoded or counted bad (unreadable, not an example, or refused by the template).
    meta = {
        "source": source.name,
        "data_format": fmt,
        "rows": encoded + bad.count,
        "bad_rows": bad.count,
        "first_bad": bad.first,
        "split": vars(split),
    }
    return TokenizedSet(ids_out, labels_out, origins, np.asarray(starts, dtype=np.int64)), meta


def _save(folder, data: TokenizedSet, meta: dict) -> None:
    import pyarrow as pa

    table = pa.table(
        {
            "input_ids": _list_array(data.input_ids),
            "labels": _list_array(data.labels),
            "answer_start": pa.array(data.answer_starts, pa.int64()),
            "origin": pa.array(data.origins, pa.string()),
        }
    )
    with atomic_dir(folder) as tmp:
        with pa.OSFile(str(tmp / TOKENS), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        (tmp / "meta.json").write_text(json.dumps(meta))


def _list_array(arrays: list[np.ndarray]):
    import pyarrow as pa

    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    values = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int64()))


def _load(folder) -> tuple[TokenizedSet, dict] | None:
    """A cached source, memory-mapped: each example's arrays are views into the Arrow file, not copies."""
    if not (folder / "meta.json").is_file():
        return None
    import pyarrow as pa

    try:
        table = pa.ipc.open_file(pa.memory_map(str(folder / TOKENS))).read_all()
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):  # a damaged cache entry is rebuilt, never trusted
        return None

    def lists(name: str) -> list[np.ndarray]:
        out = []
        for chunk in table.column(name).chunks:
            values, offsets = _int64s(chunk.values), _int64s(chunk.offsets)
            out += [values[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
        return out

    starts = [_int64s(chunk) for chunk in table.column("answer_start").chunks]
    starts = np.concatenate(starts) if starts else _NO_INTS
    data = TokenizedSet(lists("input_ids"), lists("labels"), table.column("origin").to_pylist(), starts)
    return data, meta


def _int64s(array) -> np.ndarray:
    """An Arrow int64 array (no nulls) as a view of its buffer: pyarrow's `to_numpy` imports pandas, which would
    add to every run's start."""
    if len(array) == 0:  # an empty array may have no buffer
        return _NO_INTS
    return np.frombuffer(array.buffers()[1], dtype=np.int64, count=len(array), offset=array.offset * 8)


_NO_INTS = np.zeros(0, dtype=np.int64)


# --- Validation split and duplicates --------------------------------------------------------------------------


def split_validation(data: TokenizedSet, ratio: float, seed: int) -> tuple[TokenizedSet, TokenizedSet]:
    """Hold out `ratio` of the rows (at least one) with a fixed seed; the sequences of one row stay together."""
    if ratio == 0:
        return data, data.select([])
    rows = {origin: n for n, origin in enumerate(dict.fromkeys(data.origins))}
    if len(rows) < 2:
        raise UserError(
            "train_data has a single example: nothing to hold out for validation; add val_data or set val_ratio: 0"
        )
    order = np.random.default_rng(seed).permutation(len(rows))
    held = set(order[: max(1, round(ratio * len(rows)))].tolist())
    row_of = [rows[origin] for origin in data.origins]
    return (
        data.select([i for i, r in enumerate(row_of) if r not in held]),
        data.select([i for i, r in enumerate(row_of) if r in held]),
    )


def _digests(data: TokenizedSet) -> list[bytes]:
    """Identity of an example: its exact tokens and labels (the same text formatted the same way)."""
    return [hashlib.sha1(x.tobytes() + y.tobytes()).digest() for x, y in zip(data.input_ids, data.labels)]


def count_duplicates(train: TokenizedSet, val: TokenizedSet) -> tuple[int, int]:
    """(validation examples also in train, training examples repeating an earlier one)."""
    train_digests = _digests(train)
    seen = set(train_digests)
    return sum(d in seen for d in _digests(val)), len(train_digests) - len(seen)


# --- max_length -----------------------------------------------------------------------------------------------


def fit_length(ids, labels, answer_start: int, max_length: int, policy: str):
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


def windows(ids, labels, max_length: int) -> list[tuple]:
    """Plain text longer than max_length, as windows overlapping by one token: each window's first token is the
    previous window's last, so every token after the first is predicted exactly once."""
    step = max_length - 1
    return [(ids[i : i + max_length], labels[i : i + max_length]) for i in range(0, max(1, len(ids) - 1), step)]


def fit(data: TokenizedSet, max_length: int, policy: str, split_long: bool) -> tuple[TokenizedSet, Fit]:
    """Examples that fit in max_length (plain text: windows of it), and what that took."""
    counts = Fit()
    ids_out, labels_out, origins = [], [], []
    for ids, labels, start, where in zip(data.input_ids, data.labels, data.answer_starts, data.origins):
        if split_long:
            parts = windows(ids, labels, max_length)
            counts.windows += len(parts) - 1
        else:
            fitted = fit_length(ids, labels, int(start), max_length, policy)
            if fitted is None:
                counts.dropped_too_long += 1
                counts.first_too_long = counts.first_too_long or where
                continue
            parts = [fitted]
        for part_ids, part_labels in parts:
            if not (np.asarray(part_labels[1:]) != IGNORE).any():
                counts.dropped_no_target += 1
                counts.first_no_target = counts.first_no_target or where
                continue
            counts.truncated += not split_long and len(part_ids) < len(ids)
            ids_out.append(part_ids)
            labels_out.append(part_labels)
            origins.append(where)
    return TokenizedSet(ids_out, labels_out, origins), counts


def recommend_max_length(lengths: np.ndarray, percentile: float = 99.0, multiple: int = 64) -> int:
    """The smallest multiple of `multiple` that keeps at least `percentile`% of the examples whole."""
    ordered = np.sort(lengths)
    keep = max(1, math.ceil(round(percentile * len(ordered) / 100, 9)))  # examples that must fit
    return max(multiple, math.ceil(int(ordered[keep - 1]) / multiple) * multiple)


# --- The whole preparation ------------------------------------------------------------------------------------


def load_sets(cfg: TrainConfig, encoder: Encoder, report: DataReport) -> tuple[TokenizedSet, TokenizedSet]:
    """Full-length train and validation sets (before max_length), with the split and duplicates reported."""
    if not cfg.train_data:
        raise UserError(
            "train_data is not set: give a data file (--train-data FILE) "
            "or run `loratune train` alone for the quickstart"
        )
    train, report.from_cache = encode_source(cfg.train_data, "train", cfg, encoder, report)
    if cfg.val_data:
        val, val_cached = encode_source(cfg.val_data, "validation", cfg, encoder, report)
        report.from_cache = report.from_cache and val_cached
    else:
        train, val = split_validation(train, cfg.val_ratio, cfg.seed)
    report.duplicates_train_val, report.duplicates_train = count_duplicates(train, val)
    return train, val


def prepare(cfg: TrainConfig, encoder: Encoder) -> Prepared:
    if cfg.objective == "grpo":
        from .prompts import prepare_prompts  # as pairs, it builds on this module

        return prepare_prompts(cfg, encoder)
    if cfg.objective != "sft":
        from .pairs import prepare_preferences  # pairs builds on this module (Fit, the split), so it comes later

        return prepare_preferences(cfg, encoder)
    report = DataReport(max_length=cfg.max_length, truncation=cfg.truncation)
    train_full, val_full = load_sets(cfg, encoder, report)
    text = report.data_format == "text"
    if not text:
        report.recommended_max_length = recommend_max_length(np.concatenate([train_full.lengths, val_full.lengths]))
    train, report.train_fit = fit(train_full, cfg.max_length, cfg.truncation, split_long=text)
    val, report.val_fit = fit(val_full, cfg.max_length, cfg.truncation, split_long=text)
    report.train_examples, report.val_examples = len(train), len(val)
    _refuse_empty_targets(train, report)
    test = read_examples(cfg.test_data, "test", cfg) if cfg.test_data else []
    return Prepared(train, val, test, report)


def _refuse_empty_targets(train: TokenizedSet, report: DataReport) -> None:
    f = report.train_fit
    where = f"max_length={report.max_length} with truncation={report.truncation}"
    if len(train) == 0:
        raise UserError(
            f"no training example is left at {where}: {f.dropped_too_long} are longer (first: {f.first_too_long}), "
            f"{f.dropped_no_target} have no answer token left (first: {f.first_no_target}). "
            f"max_length={report.recommended_max_length} would keep 99% whole; see `loratune data inspect`"
        )
    share = f.dropped_no_target / (len(train) + f.dropped_no_target)
    if share > MAX_EMPTY_SHARE:
        raise UserError(
            f"{share:.0%} of the training examples would train on no answer token at {where} (their answers are "
            f"cut off; first: {f.first_no_target}). Refusing to train on them: raise max_length (to "
            f"{report.recommended_max_length} to keep 99% whole) or use truncation=truncate_prompt_left"
        )
