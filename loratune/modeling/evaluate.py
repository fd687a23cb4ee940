"""Measuring a model: token-weighted loss on a dataset, and scores of generated answers against references."""

from __future__ import annotations

import math
from collections import Counter

import torch

from ..data.plan import StepPlan
from ..data.prepare import TokenizedSet
from ..data.scores import exact_match, field_accuracy, overlap_f1
from .generate import generate_texts


@torch.no_grad()
def dataset_sums(
    objective, module, data: TokenizedSet, plan: StepPlan, pad_id: int, device, rank: int = 0
) -> tuple[float, int, Counter]:
    """The objective's summed loss, unit count (target tokens for SFT) and metric sums over this process's share of
    `data`, in `plan`'s passes."""
    was_training = module.training
    module.eval()
    total, count, metrics = 0.0, 0, Counter({name: 0.0 for name in objective.metrics})
    for examples in plan.eval_passes(rank):
        out = objective.forward(module, objective.batch(plan, data, examples, pad_id).to(device))
        total += float(out.loss)
        metrics.update(out.metrics)
        count += objective.count(plan, examples)
    module.train(was_training)
    return total, count, metrics


def dataset_loss(objective, module, data, plan: StepPlan, pad_id: int, device, rank: int = 0) -> tuple[float, int]:
    """`dataset_sums`' loss and unit count."""
    return dataset_sums(objective, module, data, plan, pad_id, device, rank)[:2]


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")


# --- Scores of generations -------------------------------------------------------------------------------


def score(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Exact match, word-overlap F1 and, for JSON answers, field accuracy; each a mean over examples."""
    n = len(references)
    result = {
        "exact_match": sum(exact_match(p, r) for p, r in zip(predictions, references)) / n,
        "overlap_f1": sum(overlap_f1(p, r) for p, r in zip(predictions, references)) / n,
    }
    fields = [field_accuracy(p, r) for p, r in zip(predictions, references)]
    if all(f is not None for f in fields):
        result["field_accuracy"] = sum(fields) / n
    return result


def answer(model, tokenizer, encoder, examples, max_new_tokens: int | None = None) -> tuple[list[str], list[str]]:
    """Greedy answers to the examples' prompts (formatted as in training), and their reference answers. The
    answers may run to the longest reference + 16 tokens unless `max_new_tokens` says otherwise."""
    prompts = [encoder.prompt_ids(ex) for ex in examples]
    references = [encoder.reference(ex) for ex in examples]
    budget = max_new_tokens or max(len(tokenizer(r, add_special_tokens=False).input_ids) for r in references) + 16
    return generate_texts(model, tokenizer, prompts, encoder.end_ids, budget), references


# --- `loratune eval`: a run's base and fine-tuned model side by side ------------------------------------------
