"""`loratune data inspect` for preference data: the token lengths of prompts and of each answer (chosen and rejected;
KTO's completion), what a max_length cuts from prompts or drops, and the max_length that keeps the items whole.

max_length limits each sequence, a prompt followed by one of its answers, so an item's length here is its prompt
plus its longest answer: a longer item has its prompt cut from the left, one whose answer leaves no room for a
prompt token is dropped (as training does, `pairs.fit_prompt`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .encode import Encoder
from .inspect import DEFAULT_BATCH_SIZE, MULTIPLE, Effect, Inspection, Stats, histogram
from .pairs import LabeledAnswer, PairSet, fit_prompt, read_sets
from .plan import plan_for
from .prepare import DataReport, Fit, recommend_max_length

WHOLE = 2**31 - 1  # a max_length that keeps every item whole: the lengths before truncation


@dataclass
class PairInspection(Inspection):
    """An `Inspection` whose `target` is each item's longest answer, with every answer's lengths beside it."""

    answers: dict[str, Stats]  # chosen and rejected (KTO: completion)

    def length_rows(self) -> list[tuple[str, Stats]]:
        return [("prompt", self.prompt), *self.answers.items(), ("total (longest)", self.total)]


def inspect_pairs(cfg, encoder: Encoder, percentile: float = 99.0) -> PairInspection:
    report = DataReport(max_length=cfg.max_length, truncation="truncate_prompt_left")
    train, val = read_sets(cfg, encoder, report, WHOLE)
    items = train.items + val.items
    sides = ("completion",) if isinstance(items[0], LabeledAnswer) else ("chosen", "rejected")
    answers = {side: np.array([len(getattr(item, side)) for item in items]) for side in sides}
    prompt = np.array([len(item.prompt) for item in items])
    longest = np.max(list(answers.values()), axis=0)
    total = prompt + longest

    def effect(max_length: int) -> Effect:
        fits = Fit(truncated=int(((total > max_length) & (longest < max_length)).sum()))
        fits.dropped_too_long = int((longest >= max_length).sum())
        fits.first_too_long = next((i.origin for i, n in zip(items, longest) if n >= max_length), None)
        kept = PairSet([f for f in (fit_prompt(i, max_length) for i in train.items) if f], max_length)
        padding = 0.0
        if len(kept):
            plan = plan_for(cfg, kept.lengths, kept.target_counts, packing=False, pair_widths=kept.pair_widths)
            padding = plan.padding_share()
        return Effect(max_length, fits, int((total <= max_length).sum()), padding)

    recommended = recommend_max_length(total, percentile, MULTIPLE)
    return PairInspection(
        report=report,
        n_train=len(train),
        n_val=len(val),
        prompt=Stats.of(prompt),
        target=Stats.of(longest),
        total=Stats.of(total),
        histogram=histogram(total),
        percentile=percentile,
        recommended=recommended,
        current=effect(cfg.max_length),
        at_recommended=effect(recommended) if recommended != cfg.max_length else None,
        batch_size=cfg.batch_size if isinstance(cfg.batch_size, int) else DEFAULT_BATCH_SIZE,
        answers={side: Stats.of(lengths) for side, lengths in answers.items()},
    )
