"""`loratune data inspect`: the data's token lengths as the model will see them, and the max_length they need.

The Training Guide says max_length should be the minimum the data requires; this measures it. Lengths are those
of the fully formatted examples (chat template, end tokens), from the same cached tokens training uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..core.config import TrainConfig
from ..core.errors import UserError
from .encode import Encoder
from .plan import DEFAULT_BATCH_SIZE, plan_for
from .prepare import DataReport, Fit, TokenizedSet, fit, load_sets, recommend_max_length

PERCENTILES = (50, 90, 95, 99)
MULTIPLE = 64  # recommended lengths are multiples of this: tensor-core and kernel friendly


@dataclass
class Stats:
    """Distribution of one length; a percentile is the smallest length that many % of examples do not exceed."""

    min: int
    mean: float
    max: int
    percentiles: dict[int, int]

    @classmethod
    def of(cls, lengths: np.ndarray) -> Stats:
        pct = {p: int(np.percentile(lengths, p, method="inverted_cdf")) for p in PERCENTILES}
        return cls(int(lengths.min()), float(lengths.mean()), int(lengths.max()), pct)


@dataclass
class Effect:
    """What one max_length does: examples kept whole, truncated, dropped; and padding in padded batches."""

    max_length: int
    fit: Fit
    whole: int
    padding_share: float


@dataclass
class Inspection:
    report: DataReport
    n_train: int
    n_val: int
    prompt: Stats  # tokens before the last answer
    target: Stats  # the last answer and its end token
    total: Stats
    histogram: list[tuple[int, int, int]]  # (from, to, examples) of total lengths
    percentile: float
    recommended: int | None  # None for plain text, which is split into windows rather than truncated
    current: Effect
    at_recommended: Effect | None
    batch_size: int

    def length_rows(self) -> list[tuple[str, Stats]]:
        """The rows of the lengths table."""
        return [("prompt", self.prompt), ("target (last answer)", self.target), ("total", self.total)]


def inspect_data(cfg: TrainConfig, encoder: Encoder, percentile: float = 99.0) -> Inspection:
    if not 0 < percentile <= 100:
        raise UserError(f"--percentile {percentile:g}: must be above 0 and at most 100")
    report = DataReport(max_length=cfg.max_length, truncation=cfg.truncation)
    train, val = load_sets(cfg, encoder, report)
    both = TokenizedSet(
        train.input_ids + val.input_ids,
        train.labels + val.labels,
        train.origins + val.origins,
        np.concatenate([train.answer_starts, val.answer_starts]),
    )
    total = both.lengths
    text = report.data_format == "text"
    batch_size = cfg.batch_size if isinstance(cfg.batch_size, int) else DEFAULT_BATCH_SIZE

    def effect(max_length: int) -> Effect:
        _, counts = fit(both, max_length, cfg.truncation, split_long=text)
        kept, _ = fit(train, max_length, cfg.truncation, split_long=text)
        padding = plan_for(cfg, kept.lengths, kept.target_counts, packing=False).padding_share()
        return Effect(max_length, counts, int((total <= max_length).sum()), padding)

    recommended = None if text else recommend_max_length(total, percentile, MULTIPLE)
    return Inspection(
        report=report,
        n_train=len(train),
        n_val=len(val),
        prompt=Stats.of(both.answer_starts),
        target=Stats.of(total - both.answer_starts),
        total=Stats.of(total),
        histogram=histogram(total),
        percentile=percentile,
        recommended=recommended,
        current=effect(cfg.max_length),
        at_recommended=effect(recommended) if recommended and recommended != cfg.max_length else None,
        batch_size=batch_size,
    )


def histogram(lengths: np.ndarray, bins: int = 12) -> list[tuple[int, int, int]]:
    """Counts of lengths in bins (lo, hi] whose width is a multiple of MULTIPLE, so each hi is a max_length."""
    width = MULTIPLE * max(1, math.ceil(int(lengths.max()) / (MULTIPLE * bins)))
    counts = np.bincount((lengths - 1) // width)
    return [(k * width, (k + 1) * width, int(c)) for k, c in enumerate(counts)]


# --- The terminal view ----------------------------------------------------------------------------------------


def render(ins: Inspection, cfg: TrainConfig) -> str:
    r = ins.report
    lines = [
        f"data: {r.rows:,} rows ({r.data_format}): {ins.n_train:,} training + {ins.n_val:,} validation {r.unit}"
        + (f"; {r.bad_rows:,} malformed rows skipped (first: {r.first_bad})" if r.bad_rows else ""),
    ]
    if r.duplicates_train_val or r.duplicates_train:
        lines.append(
            f"duplicates: {r.duplicates_train_val} validation examples also in training, "
            f"{r.duplicates_train} repeats within training"
        )
    if r.split_rows:
        lines.append(r.split_line())
    columns = ("min", "mean", *(f"p{p}" for p in PERCENTILES), "max")
    head = f"{'tokens per ' + r.unit.rstrip('s'):<22}" + "".join(f"{h:>8}" for h in columns)
    lines += ["", head]
    for label, s in ins.length_rows():
        values = [s.min, f"{s.mean:.1f}", *(s.percentiles[p] for p in PERCENTILES), s.max]
        lines.append(f"  {label:<20}" + "".join(f"{v:>8}" for v in values))
    lines += ["", f"total length (tokens)   {r.unit}"]
    peak = max(c for _, _, c in ins.histogram) or 1
    for lo, hi, count in ins.histogram:
        lines.append(f"  {lo + 1:>6}-{hi:<6}  {'#' * math.ceil(40 * count / peak):<40} {count:,}")
    lines.append("")
    n = ins.n_train + ins.n_val
    lines += _effect_lines(f"max_length={cfg.max_length} (current)", ins.current, n, cfg, r)
    if ins.recommended is None:
        lines.append(
            "recommended max_length: none needed; plain text is split into windows of max_length "
            "(longer windows: more context per example, more memory)"
        )
    else:
        lines.append(
            f"recommended max_length: {ins.recommended}, the smallest multiple of {MULTIPLE} that keeps "
            f"{ins.percentile:g}% of {r.unit} whole"
        )
        if ins.at_recommended:
            lines += _effect_lines(f"max_length={ins.recommended}", ins.at_recommended, n, cfg, r)
    return "\n".join(lines)


def _effect_lines(label: str, e: Effect, n: int, cfg: TrainConfig, r: DataReport) -> list[str]:
    f = e.fit
    parts = [f"{e.whole:,} of {n:,} {r.unit} whole ({e.whole / n:.1%})"]
    if f.windows:
        parts.append(f"{f.windows:,} extra windows from long texts")
    if f.truncated:
        parts.append(f"{f.truncated:,} truncated")
    if f.dropped_too_long:
        parts.append(f"{f.dropped_too_long:,} dropped as too long")
    if f.dropped_no_target:
        parts.append(f"{f.dropped_no_target:,} dropped with no answer token left")
    batch = cfg.batch_size if isinstance(cfg.batch_size, int) else DEFAULT_BATCH_SIZE
    padded = f"padded batches of {batch} would be {e.padding_share:.0%} padding"
    return [
        f"at {label}, truncation={r.truncation}:",
        "  " + ", ".join(parts),
        "  padding: " + (f"none (packing is on); {padded}" if cfg.packing else padded),
    ]
