"""GRPO: groups of answers sampled with the current adapter, scored by reward functions, and the clipped surrogate
loss of their tokens with a KL penalty to the base without the adapter.

One step, for each of its prompts: `num_generations` answers sampled (`sample_groups`, seeded per run seed, step,
prompt and sample, so any split of the step into passes and processes, and a resumed run, samples the same); their
rewards; advantages normalised within the group. Then, per pass, each answer token's log-probability under the
adapter (and the base), and the loss. The definitions are TRL 1.16 GRPOTrainer's (`tests/test_grpo.py` checks them
against it):

- advantage = (reward - group mean) / (group std + 1e-4), the std with Bessel's correction; a group whose rewards are
  all equal (zero std) has advantage 0 everywhere and is counted;
- log-probabilities of the logits divided by the sampling temperature;
- per token: -min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon) * A), ratio to the policy that sampled the answer
  (the same weights, so 1 with gradient, unless `updates_per_generation` > 1), plus beta * ratio * KL with the k3
  estimator exp(ref - logp) - (ref - logp) - 1 (TRL's default importance-sampling correction of the KL term);
- `grpo_loss`: grpo averages each answer's tokens, then answers; dr_grpo sums each answer's tokens over
  max_new_tokens, averaged over answers; token averages over all the step's answer tokens (TRL's dapo).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..data.batching import Batch, collate_padded
from ..data.encode import IGNORE
from .generate import SeededSampling, generate_ids, row_generator
from .preference import target_logprobs

STD_EPS = 1e-4  # TRL's, added to the group's std


def group_advantages(rewards: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per answer of `rewards` [prompts x group], laid out group by group: the advantage, the group's std, and
    whether the group's rewards are all equal."""
    grouped = rewards.view(-1, group)
    std = grouped.std(dim=1, keepdim=True)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)) / (std + STD_EPS)
    zero = torch.isclose(std, torch.zeros_like(std))
    return advantages.flatten(), std.expand_as(grouped).flatten(), zero.expand_as(grouped).flatten()


@dataclass
class TokenLoss:
    """Per answer token: the loss, the KL estimate to the reference, and whether the ratio was clipped."""

    losses: torch.Tensor
    kl: torch.Tensor
    clipped: torch.Tensor


def token_loss(
    logps: torch.Tensor,
    old: torch.Tensor,
    reference: torch.Tensor | None,
    advantages: torch.Tensor,
    beta: float,
    epsilon: float,
) -> TokenLoss:
    """GRPO's loss of each answer token [N], from its log-probability now, when sampled (`old`), under the
    reference (None: no KL term) and its answer's advantage."""
    ratio = torch.exp(logps - old)
    clipped_ratio = ratio.clamp(1 - epsilon, 1 + epsilon)
    losses = -torch.min(ratio * advantages, clipped_ratio * advantages)
    kl = torch.zeros_like(logps)
    if reference is not None and beta:
        kl = torch.exp(reference - logps) - (reference - logps) - 1
        losses = losses + beta * kl * ratio
    clipped = ((ratio < 1 - epsilon) & (advantages < 0)) | ((ratio > 1 + epsilon) & (advantages > 0))
    return TokenLoss(losses, kl.detach(), clipped)


def answer_sums(values: torch.Tensor, answer: torch.Tensor, answers: int) -> torch.Tensor:
    """Per answer, the sum of its tokens' values."""
    return torch.zeros(answers, dtype=values.dtype, device=values.device).index_add(0, answer, values)


def normalised_loss(
    losses: torch.Tensor, answer: torch.Tensor, lengths: torch.Tensor, kind: str, max_new_tokens: int
) -> torch.Tensor:
    """A pass's loss in the step's units, to be divided by the step's count (answers, or answer tokens for
    `token`): per answer its token mean (grpo) or its token sum over max_new_tokens (dr_grpo); token: the sum."""
    if kind == "token":
        return losses.sum()
    sums = answer_sums(losses, answer, len(lengths))
    return (sums / (lengths.clamp(min=1) if kind == "grpo" else max_new_tokens)).sum()


# --- Sampling ---------------------------------------------------------------------------------------------------


@dataclass
class Group:
    """One prompt's sampled answers (token ids through their end token), their rewards and advantages, and their
    tokens' log-probabilities when sampled (only kept for `updates_per_generation` > 1)."""

    answers: list[list[int]]
    rewards: np.ndarray  # the weighted total per answer
    scores: dict[str, np.ndarray]  # each reward function's raw scores
    advantages: np.ndarray
    std: np.ndarray
    zero_std: np.ndarray
    old: list[torch.Tensor] | None = None


def sample_answers(model, prompts: list[list[int]], keys: list[tuple[int, ...]], cfg, end_ids, pad_id, batch_size):
    """num_generations answers per prompt, each sampled with the generator of its key + (sample,); answers of
    prompt i are at i * num_generations + j."""
    group = cfg.num_generations
    repeated = [p for p in prompts for _ in range(group)]
    generators = [row_generator(*key, j) for key in keys for j in range(group)]

    def processor_for(indices: list[int]) -> SeededSampling:
        return SeededSampling([generators[i] for i in indices], cfg.temperature, cfg.top_p)

    return generate_ids(
        model, repeated, end_ids, pad_id, cfg.max_new_tokens, batch_size * group, processor_for=processor_for
    )


def score_groups(rewards, prompts: list[str], answers: list[str], columns: dict, lengths: list[int], group: int):
    """Rewards of every answer (laid out group by group) and the groups' advantages: one `Group`'s worth of arrays
    per prompt."""
    totals, scores = rewards(prompts, answers, columns, lengths)
    totals = np.asarray(totals, dtype=np.float64)
    advantages, std, zero = (t.numpy() for t in group_advantages(torch.from_numpy(totals), group))
    cut = lambda a, k: a[k * group : (k + 1) * group]  # noqa: E731
    return [
        (cut(totals, k), {n: cut(s, k) for n, s in scores.items()}, cut(advantages, k), cut(std, k), cut(zero, k))
        for k in range(len(totals) // group)
    ]


# --- A pass ------------------------------------------------------------------------------------------------------


def answer_batch(prompts: list[list[int]], answers: list[list[int]], pad_id: int) -> Batch:
    """Prompt + answer sequences as padded rows, the answers' tokens the targets."""
    ids = [np.asarray(p + a, dtype=np.int64) for p, a in zip(prompts, answers)]
    labels = [
        np.concatenate([np.full(len(p), IGNORE), np.asarray(a)]).astype(np.int64) for p, a in zip(prompts, answers)
    ]
    return collate_padded(ids, labels, pad_id)


def answer_of_tokens(batch: Batch, rows: torch.Tensor) -> torch.Tensor:
    """The answer (row of the padded batch) each target position belongs to."""
    return torch.div(rows, batch.input_ids.shape[1], rounding_mode="floor")


class GroupForward(torch.nn.Module):
    """One pass of answers -> each answer token's log-probability under the adapter and, for the KL term, under the
    same model with the adapter switched off (no gradient). Distributed wrappers wrap this module."""

    def __init__(self, peft_model, temperature: float, reference: bool):
        super().__init__()
        self.model, self.temperature, self.reference = peft_model, temperature, reference

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        logps, rows = target_logprobs(self.model, batch, self.temperature)
        reference = None
        if self.reference:
            with torch.no_grad(), self.model.disable_adapter():
                reference = target_logprobs(self.model, batch, self.temperature)[0]
        return logps, reference, rows
