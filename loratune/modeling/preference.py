"""Preference tuning: answers' log-probabilities, and the DPO, IPO, ORPO, SimPO and KTO losses over them.

`sequence_logprobs` runs a model on a `Batch` of prompt + answer sequences (targets on the answers) and returns each
sequence's summed log-probability and target count, from SFT's per-token log-probabilities (`loss.token_logprobs`:
the output layer is frozen under LoRA, so its gradient with respect to the hidden states is computed chunk by chunk
in the forward pass; the full [tokens, vocabulary] logits never exist, and the backward pass only scales the saved
d logp_t / d hidden_t by each token's incoming gradient).

The losses are pure functions of per-sequence sums of log-probabilities (and answer token counts), each as TRL 1.16
defines it (`tests/test_preference.py` checks them against TRL's own trainers); each returns per-pair losses, whose
mean is the batch loss, and the rewards TRL reports. Where definitions differ:

- log-probabilities are sums over the answer's tokens; IPO, ORPO and SimPO divide them by the answer's token count,
  DPO and KTO use the sums. IPO's normalisation is TRL's: the IPO paper does not write it, but its authors told TRL
  that the paper's results used it.
- SimPO's default beta is 2.0, as in the SimPO paper's recipes (TRL's CPOConfig defaults to 0.1 for all its losses).
- rewards: DPO, IPO and KTO report beta * (policy - reference) summed log-probabilities; ORPO and SimPO, which have
  no reference, beta * the policy's mean log-probabilities.
- ORPO's NLL term is an input: TRL's ORPOTrainer takes it over the prompt's tokens as well as the answer's
  (every non-padding token), and averages it over all of a batch's chosen tokens rather than per pair; per pair
  (or with chosen sequences of equal length) the two agree. SFT in loratune learns the answers only: the ORPO
  objective passes the chosen answer's mean NLL.
- KTO's KL reference point is the batch's mean of policy - reference log-probabilities of mismatched pairs (each
  prompt with another row's answer, see `data.pairs.kl_pairs`), detached and floored at 0. TRL averages it over
  processes before the floor: `kl_estimate` gives the local mean to all-reduce, `kto_loss` floors it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.batching import Batch
from ..data.encode import IGNORE
from .loss import _plain_head, logprobs_of_logits, token_logprobs


@dataclass
class SequenceLogprobs:
    """Per sequence of a batch: summed log-probability of its targets, and their count."""

    sums: torch.Tensor  # fp32 [S]
    counts: torch.Tensor  # int64 [S]


def sequence_logprobs(model: torch.nn.Module, batch: Batch) -> SequenceLogprobs:
    """Log-probabilities of a batch's targets, summed per sequence: per row of a padded batch, per example of a
    packed row (a packed row's filler segment is not a sequence). `model` is the PEFT model or a plain causal LM;
    for the reference, call it on the PEFT model inside `model.disable_adapter()` and `torch.no_grad()`."""
    logps, rows = target_logprobs(model, batch)
    sequence, count = _sequence_of_positions(batch)
    seq = sequence[rows]
    sums = torch.zeros(count, dtype=torch.float32, device=logps.device).index_add(0, seq, logps)
    return SequenceLogprobs(sums, torch.bincount(seq, minlength=count))


def target_logprobs(
    model: torch.nn.Module, batch: Batch, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 log-probability of each target token of a batch under the logits divided by `temperature`, and the
    target's position in the flattened batch, in order."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    inputs = dict(input_ids=batch.input_ids, position_ids=batch.position_ids)
    if batch.cu_seqlens is not None:  # example boundaries for packed attention, as CausalLMLoss gives them
        cu, longest = batch.cu_seqlens, batch.max_seqlen
        inputs |= dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    mask = batch.attention_mask if batch.attention_mask is not None else torch.ones_like(batch.input_ids)
    targets = batch.targets.flatten()
    rows = (targets != IGNORE).nonzero().squeeze(1)
    if _plain_head(lm):  # logits / t = (hidden / t) @ W.T
        hidden = lm.get_decoder()(**inputs, attention_mask=mask).last_hidden_state.flatten(0, 1)[rows]
        hidden = hidden / temperature if temperature != 1 else hidden
        return token_logprobs(hidden, lm.get_output_embeddings(), targets[rows]), rows
    # logits transformed after the output layer (soft-capping, scaling): the model's own
    logits = lm(**inputs, attention_mask=mask).logits.flatten(0, 1)[rows]
    return logprobs_of_logits(logits / temperature if temperature != 1 else logits, targets[rows]), rows


def _sequence_of_positions(batch: Batch) -> tuple[torch.Tensor, int]:
    """Which sequence each position of the flattened batch belongs to, and how many sequences there are."""
    rows, width = batch.input_ids.shape
    if batch.cu_seqlens is None:
        return torch.arange(rows, device=batch.input_ids.device).repeat_interleave(width), rows
    ends = batch.cu_seqlens[1:].long()
    positions = torch.arange(width, device=ends.device)
    return torch.searchsorted(ends, positions, right=True), len(ends) - (1 if batch.padding else 0)


# --- The losses -----------------------------------------------------------------------------------------------


@dataclass
class PairLogprobs:
    """Summed log-probabilities of each pair's chosen and rejected answers [P], and their token counts [P]."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    @staticmethod
    def from_sequences(seqs: SequenceLogprobs) -> PairLogprobs:
        """From a batch laid out as [chosen of every pair, then rejected of every pair]."""
        chosen, rejected = seqs.sums.chunk(2)
        chosen_tokens, rejected_tokens = seqs.counts.chunk(2)
        return PairLogprobs(chosen, rejected, chosen_tokens, rejected_tokens)

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.chosen / self.chosen_tokens.clamp(min=1), self.rejected / self.rejected_tokens.clamp(min=1)


@dataclass
class PreferenceLoss:
    """Per pair: the loss (the batch loss is their mean) and the rewards TRL reports."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    @property
    def margins(self) -> torch.Tensor:
        return self.chosen_rewards - self.rejected_rewards

    @property
    def accuracies(self) -> torch.Tensor:
        return (self.chosen_rewards > self.rejected_rewards).float()


def dpo_loss(policy: PairLogprobs, reference: PairLogprobs, beta: float = 0.1) -> PreferenceLoss:
    """DPO (sigmoid): -log sigmoid(beta * (chosen log-ratio - rejected log-ratio))."""
    chosen, rejected = policy.chosen - reference.chosen, policy.rejected - reference.rejected
    return PreferenceLoss(-F.logsigmoid(beta * (chosen - rejected)), *_rewards(beta, chosen, rejected))


def ipo_loss(policy: PairLogprobs, reference: PairLogprobs, beta: float = 0.1) -> PreferenceLoss:
    """IPO: (length-normalised log-ratio margin - 1 / (2 beta))^2; rewards from the summed log-ratios."""
    chosen, rejected = policy.chosen - reference.chosen, policy.rejected - reference.rejected
    margin = chosen / policy.chosen_tokens.clamp(min=1) - rejected / policy.rejected_tokens.clamp(min=1)
    return PreferenceLoss((margin - 1 / (2 * beta)) ** 2, *_rewards(beta, chosen, rejected))


def orpo_loss(policy: PairLogprobs, chosen_nll: torch.Tensor, beta: float = 0.1) -> PreferenceLoss:
    """ORPO: the chosen sequence's mean NLL (`chosen_nll` [P]) - beta (lambda) * log sigmoid(log odds ratio), the
    odds of the answers' mean log-probabilities."""
    chosen, rejected = policy.means()
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    return PreferenceLoss(chosen_nll - beta * F.logsigmoid(log_odds), *_rewards(beta, chosen, rejected))


def simpo_loss(policy: PairLogprobs, beta: float = 2.0, gamma: float = 0.5) -> PreferenceLoss:
    """SimPO: -log sigmoid(beta * (chosen - rejected mean log-probabilities) - gamma); no reference model."""
    chosen, rejected = policy.means()
    return PreferenceLoss(-F.logsigmoid(beta * (chosen - rejected) - gamma), *_rewards(beta, chosen, rejected))


def _rewards(beta: float, chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return beta * chosen.detach(), beta * rejected.detach()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2 (Maechler's two forms)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


@dataclass
class KTOLoss:
    """Per row: the loss (the batch loss is their mean), the reward beta * log-ratio, and the row's label; `kl` is
    the reference point used."""

    losses: torch.Tensor
    rewards: torch.Tensor
    labels: torch.Tensor  # bool: desirable
    kl: torch.Tensor

    @property
    def chosen_rewards(self) -> torch.Tensor:
        return self.rewards[self.labels]

    @property
    def rejected_rewards(self) -> torch.Tensor:
        return self.rewards[~self.labels]

    @property
    def margin(self) -> torch.Tensor:
        """Mean desirable reward - mean undesirable reward, as TRL reports it (nan without one of either)."""
        return self.chosen_rewards.mean() - self.rejected_rewards.mean()


def kl_estimate(policy_kl: torch.Tensor, reference_kl: torch.Tensor) -> torch.Tensor:
    """KTO's KL term before the floor: the mean log-ratio of the mismatched pairs, detached (average it over
    processes, as TRL does, before `kto_loss`)."""
    return (policy_kl - reference_kl).mean().detach()


def kto_loss(
    policy: torch.Tensor,
    reference: torch.Tensor,
    labels: torch.Tensor,
    kl: torch.Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOLoss:
    """KTO: desirable rows 1 - sigmoid(beta * (log-ratio - KL)), undesirable 1 - sigmoid(beta * (KL - log-ratio)),
    each weighted; `policy` and `reference` are the rows' summed log-probabilities, `kl` from `kl_estimate`."""
    kl = kl.clamp(min=0)
    ratio = policy - reference
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio)))
    return KTOLoss(torch.where(labels, desirable, undesirable), beta * ratio.detach(), labels, kl)


# --- The module a preference pass runs through ------------------------------------------------------------------


class PreferenceForward(torch.nn.Module):
    """One pass of preference sequences -> each sequence's summed log-probability under the adapter, its target
    count, and, where the loss has a reference, its log-probability under the same model with the adapter switched
    off (no second copy of the base, no gradient), unless given (computed in an earlier epoch). Distributed wrappers
    wrap this module, as `CausalLMLoss`."""

    def __init__(self, peft_model, reference: bool):
        super().__init__()
        self.model = peft_model
        self.reference = reference

    def forward(
        self, batch: Batch, reference: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        policy = sequence_logprobs(self.model, batch)
        if not self.reference or reference is not None:
            return policy.sums, policy.counts, reference
        with torch.no_grad(), self.model.disable_adapter():
            reference = sequence_logprobs(self.model, batch).sums
        return policy.sums, policy.counts, reference
