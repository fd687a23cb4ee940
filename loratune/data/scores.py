"""Scores of one answer against its reference: the held-out test's metrics and the GRPO rewards read the same ones."""

from __future__ import annotations

import json
import re
from collections import Counter


def exact_match(prediction: str, reference: str) -> bool:
    """Equal once leading and trailing whitespace is stripped from both (case and inner spacing count)."""
    return prediction.strip() == reference.strip()


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def overlap_f1(prediction: str, reference: str) -> float:
    """Word-overlap F1 (as in SQuAD): partial credit for partly right answers."""
    pred, ref = Counter(_words(prediction)), Counter(_words(reference))
    common = sum((pred & ref).values())
    if common == 0:
        return float(not pred and not ref)
    precision, recall = common / sum(pred.values()), common / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


def field_accuracy(prediction: str, reference: str) -> float | None:
    """Share of a JSON reference's fields the prediction got exactly right; None when the reference is not JSON."""
    try:
        ref = json.loads(reference)
    except ValueError:
        return None
    if not isinstance(ref, dict) or not ref:
        return None
    try:
        pred = json.loads(prediction)
    except ValueError:
        return 0.0
    if not isinstance(pred, dict):
        return 0.0
    return sum(pred.get(k) == v for k, v in ref.items()) / len(ref)
