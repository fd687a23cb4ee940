"""Preference rows -> token ids: a prompt with a chosen and a rejected answer (DPO, IPO, ORPO, SimPO), or a prompt
with one answer labelled desirable or not (KTO).

Row shapes, detected from the first row's columns:

| shape | columns |
| --- | --- |
| `pairs` | `prompt`, `chosen`, `rejected`: all text, or a list of turns and two one-turn assistant answers |
| `pairs` (implicit prompt) | `chosen`, `rejected`: two conversations that differ only in their last assistant turn |
| `kto` | `prompt`, `completion` (text, or turns and a one-turn answer), `label` (true: desirable) |

Text rows are raw text, as SFT's `prompt_completion` shape: no chat template, an end token after each answer.
Conversations are rendered by SFT's `Encoder`: each answer is encoded as the last turn of the prompt's conversation,
so its prompt tokens are those generation is given and its tokens are those the model would produce after them.
An answer ends at the template's end-of-turn token, as in SFT and generation; TRL's DPO and KTO trainers keep what
the template writes after it too (ChatML's newline). The chosen and rejected answers of a pair must follow identical
prompt tokens, else their log-probabilities would not be comparable: a template that renders the prompt differently
before each (one that writes the date, say) is refused.

`max_length` keeps answers whole and cuts the prompt from the left (one prompt token at least, so the answer's
first token is predicted); a pair whose longer answer cannot fit is dropped and counted, as SFT's
`truncate_prompt_left` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np

from ..core.errors import UserError
from .batching import Batch, collate_packed, collate_padded
from .encode import IGNORE, Encoder
from .formats import Example, RowError, require_answers, to_example
from .load import BadRows, open_source
from .prepare import DataReport, Fit, Prepared, read_examples, split_validation
from .reference_cache import ReferenceCache, sequence_key

SHAPES = {"kto": ("prompt", "completion", "label"), "pairs": ("chosen", "rejected")}


@dataclass
class PreferencePair:
    """One prompt and two answers, as token ids; the answers end with their end-of-turn token."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    origin: str

    def sequences(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(ids, labels) of prompt + chosen and prompt + rejected: the answers are the targets."""
        return [_sequence(self.prompt, answer) for answer in (self.chosen, self.rejected)]


@dataclass
class LabeledAnswer:
    """One prompt and one answer (KTO), desirable or not."""

    prompt: list[int]
    completion: list[int]
    label: bool
    origin: str

    def sequence(self) -> tuple[np.ndarray, np.ndarray]:
        return _sequence(self.prompt, self.completion)


@dataclass
class PreferenceSet:
    """A source's rows as pairs (or labelled answers), and what became of the rows on the way."""

    shape: str
    items: list[PreferencePair] | list[LabeledAnswer]
    rows: int = 0
    bad_rows: int = 0
    first_bad: str | None = None
    fit: Fit = field(default_factory=Fit)  # truncated, dropped_too_long, first_too_long
    text: bool = False  # the first row's prompt is raw text (else turns rendered by the chat template)


def _sequence(prompt: list[int], answer: list[int]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(prompt + answer, dtype=np.int64)
    return ids, np.concatenate([np.full(len(prompt), IGNORE, dtype=np.int64), ids[len(prompt) :]])


def read_preferences(
    spec: str, encoder: Encoder, max_length: int, skip_bad_rows: bool = False, split: str = "train"
) -> PreferenceSet:
    """Every row of a source (file, folder or hub dataset) as token ids, fitted to `max_length`."""
    source, bad = open_source(spec, split), BadRows(skip_bad_rows)
    out: PreferenceSet | None = None
    for where, row in source.rows(bad):
        if out is None:
            out = PreferenceSet(_detect(list(row), where), [], text=isinstance(row.get("prompt"), str))
        try:
            item = _encode_pair(row, encoder, where) if out.shape == "pairs" else _encode_labeled(row, encoder, where)
        except RowError as e:
            bad(where, str(e))
            continue
        fitted = fit_prompt(item, max_length)
        if fitted is None:
            out.fit.dropped_too_long += 1
            out.fit.first_too_long = out.fit.first_too_long or where
            continue
        out.fit.truncated += len(fitted.prompt) < len(item.prompt)
        out.items.append(fitted)
    if out is None and not bad.count:
        raise UserError(f"{source.name}: no rows (the file or folder is empty)")
    if out is None or not out.items:  # with no shape detected, every row was bad
        too_long = f"{out.fit.first_too_long}: no room for the answer and a prompt token in max_length={max_length}"
        raise UserError(f"{source.name}: no usable preference rows (first problem: {bad.first or too_long})")
    # Every row was kept, dropped for its length, or counted bad (unreadable, malformed, refused by the template).
    out.rows = len(out.items) + out.fit.dropped_too_long + bad.count
    out.bad_rows, out.first_bad = bad.count, bad.first
    return out


def _detect(columns: list[str], where: str) -> str:
    for shape, needed in SHAPES.items():
        if all(c in columns for c in needed):
            return shape
    expected = "; ".join(f"{s}: {', '.join(c)}" for s, c in SHAPES.items())
    raise UserError(f"{where}: not a preference row: columns {sorted(columns)}; expected one of ({expected})")


def fit_prompt(item: PreferencePair | LabeledAnswer, max_length: int) -> PreferencePair | LabeledAnswer | None:
    """The item with its prompt cut from the left so that prompt + its longest answer fit; None if no prompt token
    could stay (the answer's first token needs one before it)."""
    answers = (item.chosen, item.rejected) if isinstance(item, PreferencePair) else (item.completion,)
    room = max_length - max(map(len, answers))
    if room < 1:
        return None
    return replace(item, prompt=item.prompt[-room:])


def kl_pairs(items: list[LabeledAnswer], max_length: int) -> list[LabeledAnswer]:
    """KTO's mismatched pairs for its KL estimate, as TRL builds them within a batch: each prompt with the
    previous row's answer (the first prompt with the last answer). The prompt is cut from the left to fit, as
    everywhere here (TRL's collator would cut the sequence's end instead)."""
    rotated = [items[-1], *items[:-1]]
    mismatched = (replace(a, completion=b.completion) for a, b in zip(items, rotated))
    return [fit_prompt(item, max_length) for item in mismatched]


# --- Rows -> Examples -> ids ----------------------------------------------------------------------------------


def _encode_pair(row: dict, encoder: Encoder, where: str) -> PreferencePair:
    chosen, rejected = _implicit(row) if "prompt" not in row else (_example(row, "chosen"), _example(row, "rejected"))
    prompt, chosen_ids = _split(encoder, chosen)
    rejected_prompt, rejected_ids = _split(encoder, rejected)
    if prompt != rejected_prompt:
        raise RowError(
            "the chat template rendered the prompt into different tokens before the chosen and the rejected answer "
            "(does it write text that changes between renders, such as the date?), so their log-probabilities "
            "would not be comparable; set chat_template to a template that renders a prompt the same way each time"
        )
    if chosen_ids == rejected_ids:
        raise RowError("chosen and rejected are the same answer: nothing to prefer")
    return PreferencePair(prompt, chosen_ids, rejected_ids, where)


def _encode_labeled(row: dict, encoder: Encoder, where: str) -> LabeledAnswer:
    label = row.get("label")
    if isinstance(label, str) and label.strip().lower() in ("true", "false"):  # CSV and TSV have no booleans
        label = label.strip().lower() == "true"
    if not isinstance(label, bool):
        raise RowError(f"field 'label' must be true or false (true: the completion is desirable), got {label!r}")
    prompt, completion = _split(encoder, _example(row, "completion"))
    return LabeledAnswer(prompt, completion, label, where)


def _example(row: dict, side: str) -> Example:
    """The prompt and one answer as an Example: text as raw text, turns as a conversation ending in the answer."""
    prompt, answer = row.get("prompt"), row.get(side)
    if not isinstance(prompt, list) and not isinstance(answer, list):
        example = to_example(row, "prompt_completion", {"completion": side})
        require_answers(example, "prompt_completion", {"completion": side})
        return example
    if not (isinstance(prompt, list) and isinstance(answer, list)):
        raise RowError(f"fields 'prompt' and {side!r} must both be text or both be lists of turns")
    name = f"prompt+{side}"  # turns are numbered within the prompt's turns followed by the answer's
    example = to_example({name: prompt + answer}, "messages", {"messages": name})
    require_answers(example, "messages", {"messages": name})
    if len(answer) != 1 or example.messages[-1]["role"] != "assistant":
        got = f"{len(answer)} turns" if len(answer) != 1 else f"a {example.messages[-1]['role']} turn"
        raise RowError(f"field {side!r} must be one assistant turn (the answer to the prompt), got {got}")
    return example


def _implicit(row: dict) -> tuple[Example, Example]:
    """Two conversations whose shared beginning is the prompt: they may differ only in the last assistant turn."""
    chosen, rejected = (to_example(row, "messages", {"messages": side}) for side in ("chosen", "rejected"))
    for side, example in (("chosen", chosen), ("rejected", rejected)):
        require_answers(example, "messages", {"messages": side})
        if example.messages[-1]["role"] != "assistant":
            raise RowError(f"field {side!r} must end with an assistant turn: the answer")
    if chosen.messages[:-1] != rejected.messages[:-1]:
        raise RowError(
            "without a 'prompt' field, chosen and rejected must be the same conversation up to their last turn "
            "(the prompt), each ending in its own assistant answer"
        )
    return chosen, rejected


def _split(encoder: Encoder, example: Example) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of the example's last answer, as SFT encodes it (answer through its end token)."""
    sequence = encoder.encode(example)[-1]
    prompt, answer = sequence.ids[: sequence.answer_start], sequence.ids[sequence.answer_start :]
    if not prompt:
        raise RowError("the prompt is empty: the answer's first token would follow nothing")
    return prompt, answer


# --- Pairs as training examples ------------------------------------------------------------------------------

# What a run of each objective reads, and what its examples are called in the data report.
OBJECTIVE_SHAPE = {"kto": "kto"}
UNITS = {"pairs": "pairs", "kto": "rows"}


class PairSet:
    """Preference items as a run's examples (`StepPlan` sees one per pair, or per KTO row): `lengths` are the
    tokens of all of an item's sequences, which go into the same pass, and `target_counts` their answer tokens.
    A KTO row's second sequence is its mismatched pair (`kl_pairs` over the set), for the KL estimate.

    `reference` holds each sequence's log-probability under the reference model once a pass has computed it (NaN
    before): the frozen base and the tokens do not change during a run, so later epochs reuse it."""

    def __init__(self, items: list, max_length: int):
        self.items, self.max_length = items, max_length
        self.kl = kl_pairs(items, max_length) if items and isinstance(items[0], LabeledAnswer) else None
        self.seqs = [self._sequences(i) for i in range(len(items))]
        self.lengths = np.array([sum(len(ids) for ids, _ in s) for s in self.seqs], dtype=np.int64)
        self.pair_widths = np.array([max(len(ids) for ids, _ in s) for s in self.seqs], dtype=np.int64)
        self.target_counts = np.array(
            [sum(int((y[1:] != IGNORE).sum()) for _, y in s) for s in self.seqs], dtype=np.int64
        )
        self.reference = np.full((len(items), 2), np.nan, dtype=np.float32)
        self.stored: ReferenceCache | None = None

    def use_stored(self, cache: ReferenceCache) -> None:
        """Take the reference log-probabilities `cache` holds for these sequences, and save new ones to it."""
        self.stored = cache
        cache.fill(self.keys, self.reference)

    def keep(self) -> None:
        """Save the reference log-probabilities computed so far to the cache given to `use_stored`."""
        if self.stored is not None:
            self.stored.save(self.keys, self.reference)

    @cached_property
    def keys(self) -> np.ndarray:
        """Each sequence's cache key [items, 2], laid out as `reference`."""
        return np.array([[sequence_key(ids, labels) for ids, labels in s] for s in self.seqs], dtype=object)

    def _sequences(self, i: int) -> list[tuple[np.ndarray, np.ndarray]]:
        item = self.items[i]
        return item.sequences() if self.kl is None else [item.sequence(), self.kl[i].sequence()]

    def __len__(self) -> int:
        return len(self.items)

    @property
    def origins(self) -> list[str]:
        return [item.origin for item in self.items]

    @property
    def labels(self) -> np.ndarray:
        """KTO: whether each row's answer is desirable."""
        return np.array([item.label for item in self.items], dtype=bool)

    def select(self, indices) -> PairSet:
        """A subset; KTO's mismatched pairs are drawn again within it (a split's rows never see the other's)."""
        return PairSet([self.items[i] for i in indices], self.max_length)

    def collate(self, examples, packing: bool, pad_id: int, filler: bool) -> Batch:
        """The pass of these items: every item's first sequence, then every item's second (chosen then rejected;
        KTO: the rows then their mismatched pairs), as packed rows (a filler segment up to a shape bucket with
        `filler`) or padded rows."""
        seqs = [self.seqs[i][k] for k in (0, 1) for i in examples]
        ids, labels = [x for x, _ in seqs], [y for _, y in seqs]
        if packing:
            return collate_packed(ids, labels, pad_id if filler else None)
        return collate_padded(ids, labels, pad_id)


def prepare_preferences(cfg, encoder: Encoder) -> Prepared:
    """`data.prepare` for a preference objective: the train and validation sets as `PairSet`s, with the report."""
    report = DataReport(max_length=cfg.max_length, truncation="truncate_prompt_left")
    train, val = read_sets(cfg, encoder, report, cfg.max_length)
    report.train_examples, report.val_examples = len(train), len(val)
    test = read_examples(cfg.test_data, "test", cfg) if cfg.test_data else []
    return Prepared(train, val, test, report)


def read_sets(cfg, encoder: Encoder, report: DataReport, max_length: int) -> tuple[PairSet, PairSet]:
    """The run's training and validation sets fitted to `max_length`, with what reading and fitting did in
    `report` (its shape, unit, rows and fits)."""
    shape = OBJECTIVE_SHAPE.get(cfg.objective, "pairs")
    report.data_format, report.unit = shape, UNITS[shape]
    train, report.train_fit = read_set(cfg.train_data, "train", cfg, encoder, report, max_length)
    if cfg.val_data:
        val, report.val_fit = read_set(cfg.val_data, "validation", cfg, encoder, report, max_length)
    else:
        train, val = split_validation(train, cfg.val_ratio, cfg.seed)
    return train, val


def read_set(spec, split: str, cfg, encoder: Encoder, report: DataReport, max_length: int) -> tuple[PairSet, Fit]:
    """One source as the run's objective reads it (its rows counted in `report`), and what max_length did."""
    if not spec:
        raise UserError("train_data is not set: give a preference data file (--train-data FILE)")
    shape = OBJECTIVE_SHAPE.get(cfg.objective, "pairs")
    found = read_preferences(spec, encoder, max_length, cfg.skip_bad_rows, split)
    if found.shape != shape:
        raise UserError(
            f"{spec}: rows of shape {found.shape} ({', '.join(SHAPES[found.shape])}), but objective {cfg.objective} "
            f"trains on {shape} rows ({', '.join(SHAPES[shape])})"
        )
    report.prompt_format = "prompt_completion" if found.text else "messages"
    report.rows += found.rows
    report.bad_rows += found.bad_rows
    report.first_bad = report.first_bad or found.first_bad
    return PairSet(found.items, max_length), found.fit
