"""Measuring a model: token-weighted loss on a dataset, and scores of generated answers against references."""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import numpy as np
import torch

from .data.batching import collate_packed, collate_padded
from .data.prepare import TokenizedSet


@torch.no_grad()
def dataset_loss(loss_module, data: TokenizedSet, batch_size: int, packing: bool, pad_id: int, device,
                 shard: tuple[int, int] = (0, 1)) -> tuple[float, int]:
    """Summed cross-entropy and target-token count over this process's shard of `data`."""
    rank, world = shard
    was_training = loss_module.training
    loss_module.eval()
    order = np.argsort(data.lengths, kind="stable")[rank::world]
    total, count = 0.0, 0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, labels = [data.input_ids[i] for i in idx], [data.labels[i] for i in idx]
        batch = collate_packed(ids, labels) if packing else collate_padded(ids, labels, pad_id)
        total += float(loss_module(batch.to(device)))
        count += batch.n_targets
    loss_module.train(was_training)
    return total, count


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")


# --- Scores of generations -------------------------------------------------------------------------------


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


def score(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Exact match, word-overlap F1 and, for JSON answers, field accuracy; each a mean over examples."""
    n = len(references)
    result = {
        "exact_match": sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / n,
        "overlap_f1": sum(overlap_f1(p, r) for p, r in zip(predictions, references)) / n,
    }
    fields = [field_accuracy(p, r) for p, r in zip(predictions, references)]
    if all(f is not None for f in fields):
        result["field_accuracy"] = sum(fields) / n
    return result
