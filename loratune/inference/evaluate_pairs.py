"""`loratune eval` of a preference run: its objective's loss, reward accuracy, rewards and margins on a file of pairs
(KTO: labelled answers), for the base model (the adapter off: the reference) and the tuned adapter.

The pairs are read and fitted to max_length as training read its validation set, and go through the objective in
the passes the run's validation made, so the tuned adapter's numbers on the run's own validation file are its last
validation line's. With the adapter off the policy is the reference: DPO, IPO and KTO then have rewards 0 and the
loss they start training from; ORPO and SimPO, which have no reference, score the base model itself.
"""

from __future__ import annotations

import contextlib

from ..data.pairs import read_set
from ..data.prepare import DataReport
from ..modeling.evaluate import dataset_sums
from .run import LoadedRun


def evaluate_pairs(run: LoadedRun, data: str, objective, module, plan_of) -> dict:
    """The summary of `eval` on `data`: per model, the loss and each of the objective's metrics, means over the
    objective's units. `plan_of(pairs)` gives the passes over the read pairs."""
    cfg = run.config
    report = DataReport(max_length=cfg.max_length, truncation="truncate_prompt_left")
    pairs, fitted = read_set(data, "test", cfg, run.encoder, report, cfg.max_length)
    plan = plan_of(pairs)
    summary = {"objective": cfg.objective, "unit": objective.unit, "examples": report.rows,
               "scored_examples": len(pairs), "dropped_too_long": fitted.dropped_too_long,
               "truncated": fitted.truncated}  # fmt: skip
    for name, use in (("base", run.model.disable_adapter), ("fine_tuned", contextlib.nullcontext)):
        with use():
            total, count, metrics = dataset_sums(objective, module, pairs, plan, run.tokenizer.pad_token_id, run.device)
        summary[name] = {"loss": total / count} | {metric: value / count for metric, value in metrics.items()}
    summary[objective.unit_key] = count
    return summary
