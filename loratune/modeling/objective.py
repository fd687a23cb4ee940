"""What a run trains for: the objective turns a step's examples into passes' tensors and each pass into a sum of
losses, and says how many units (target tokens, pairs, sampled answers) the step's loss is the mean over.

The loop and the step never ask which objective runs: they call `batch`, `forward` and `count`, back-propagate
`loss / count` of the whole step (all passes and processes), and log the mean of each metric the same way, so
every objective's update is the same for any split of a step. SFT is the first objective; a preference loss
(pairs of answers) or GRPO (groups of sampled answers) is another subclass here, its module beside `loss.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from ..data.batching import Batch
from .loss import CausalLMLoss
from .preference import (
    PairLogprobs,
    PreferenceForward,
    PreferenceLoss,
    SequenceLogprobs,
    dpo_loss,
    ipo_loss,
    kl_estimate,
    kto_loss,
    orpo_loss,
    simpo_loss,
)


class LossSum(NamedTuple):
    """One pass: the loss summed over its units, and other per-unit quantities summed the same way."""

    loss: torch.Tensor
    metrics: dict[str, float]


class Objective:
    name: str
    unit: str  # what a step's loss is the mean over
    metrics: tuple[str, ...] = ()  # the names of `forward`'s metric sums

    @property
    def unit_key(self) -> str:
        """The unit as a field name: what counts them in the step lines and summary.json (`target_tokens` for SFT)."""
        return self.unit.replace(" ", "_")

    def module(self, peft_model, shape_buckets: bool = False) -> torch.nn.Module:
        """The module a pass runs through: what the engine wraps, shards and back-propagates through."""
        raise NotImplementedError

    def forward(self, module: torch.nn.Module, batch) -> LossSum:
        raise NotImplementedError

    def count(self, plan, examples) -> int:
        """The units of these examples of the plan's set: the step's loss is divided by the step's count."""
        raise NotImplementedError

    def batch(self, plan, data, examples, pad_id: int):
        """The tensors of the pass of these examples, laid out as the plan says (packed or padded)."""
        return plan.batch(data, examples, pad_id)


class SFT(Objective):
    """Supervised fine-tuning: cross-entropy of the answer tokens (the chat template's targets)."""

    name, unit = "sft", "target tokens"

    def module(self, peft_model, shape_buckets: bool = False) -> torch.nn.Module:
        return CausalLMLoss(peft_model, shape_buckets=shape_buckets)

    def forward(self, module: torch.nn.Module, batch) -> LossSum:
        return LossSum(module(batch), {})

    def count(self, plan, examples) -> int:
        return int(plan.targets[np.asarray(examples, dtype=np.int64)].sum())


# --- Preference objectives: a pass's pairs (chosen and rejected of a pair in the same pass), the loss a mean over
# pairs. Their losses and rewards are `preference`'s, checked against TRL's trainers in tests/test_preference.py.

PAIR_METRICS = ("reward_accuracy", "chosen_reward", "rejected_reward", "reward_margin", "chosen_logp", "rejected_logp")


@dataclass
class PairBatch:
    """A preference pass: its sequences (every item's first, then every item's second: chosen then rejected, or
    KTO's rows then their mismatched pairs), the items, the reference's log-probabilities of the sequences when
    the set has them all, and KTO's labels (desirable or not)."""

    sequences: Batch
    examples: np.ndarray
    cache: np.ndarray  # the set's reference log-probabilities [items, 2], NaN where not computed yet
    reference: torch.Tensor | None = None
    labels: torch.Tensor | None = None

    @property
    def input_ids(self) -> torch.Tensor:
        return self.sequences.input_ids

    @property
    def n_tokens(self) -> int:
        return self.sequences.n_tokens

    @property
    def n_targets(self) -> int:
        return self.sequences.n_targets

    def to(self, device) -> PairBatch:
        move = lambda t: t.to(device) if t is not None else None  # noqa: E731
        return PairBatch(self.sequences.to(device), self.examples, self.cache, move(self.reference), move(self.labels))

    def sequence_reference(self, module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The module's log-probability sums and counts, and the reference's, which are kept for later epochs."""
        sums, counts, reference = module(self.sequences, self.reference)
        if self.reference is None and reference is not None:
            self.cache[self.examples] = reference.detach().float().cpu().view(2, -1).T.numpy()
        return sums, counts, reference


class Pairs(Objective):
    """A loss of each pair's chosen and rejected answers' log-probabilities; the data is a `data.pairs.PairSet`."""

    unit, metrics = "pairs", PAIR_METRICS
    reference = True  # whether the loss compares with the model without its adapter

    def __init__(self, cfg):
        self.cfg = cfg

    def module(self, peft_model, shape_buckets: bool = False) -> torch.nn.Module:
        return PreferenceForward(peft_model, self.reference)

    def batch(self, plan, data, examples, pad_id: int) -> PairBatch:
        examples = np.asarray(examples, dtype=np.int64)
        known = data.reference[examples].T.reshape(-1)  # laid out as the sequences are
        reference = torch.from_numpy(known) if self.reference and not np.isnan(known).any() else None
        sequences = data.collate(examples, plan.packing, pad_id, filler=plan.buckets)
        return PairBatch(sequences, examples, data.reference, reference)

    def count(self, plan, examples) -> int:
        return len(examples)

    def forward(self, module: torch.nn.Module, batch: PairBatch) -> LossSum:
        sums, counts, reference = batch.sequence_reference(module)
        policy = PairLogprobs.from_sequences(SequenceLogprobs(sums, counts))
        ref = None if reference is None else PairLogprobs.from_sequences(SequenceLogprobs(reference, counts))
        out = self.loss(policy, ref)
        values = (out.accuracies, out.chosen_rewards, out.rejected_rewards, out.margins, policy.chosen, policy.rejected)
        return LossSum(out.losses.sum(), {name: float(v.detach().sum()) for name, v in zip(PAIR_METRICS, values)})

    def loss(self, policy: PairLogprobs, reference: PairLogprobs | None) -> PreferenceLoss:
        raise NotImplementedError


class DPO(Pairs):
    name = "dpo"

    def loss(self, policy: PairLogprobs, reference: PairLogprobs | None) -> PreferenceLoss:
        return (ipo_loss if self.cfg.dpo_loss == "ipo" else dpo_loss)(policy, reference, self.cfg.beta)


class ORPO(Pairs):
    name, reference = "orpo", False

    def loss(self, policy: PairLogprobs, reference: PairLogprobs | None) -> PreferenceLoss:
        # the chosen answer's mean NLL: SFT's loss on the answer tokens, per pair
        return orpo_loss(policy, -policy.means()[0], self.cfg.orpo_lambda)


class SimPO(Pairs):
    name, reference = "simpo", False

    def loss(self, policy: PairLogprobs, reference: PairLogprobs | None) -> PreferenceLoss:
        return simpo_loss(policy, self.cfg.simpo_beta, self.cfg.simpo_gamma)


class KTO(Pairs):
    """Answers labelled desirable or not; the KL reference point is the pass's mean over its rows' mismatched pairs
    (TRL's is its micro-batch's, averaged over processes): unlike the pairs' losses, it depends on the split of a step
    into passes. Metrics: the KL estimate, and the reward signed by the label (positive when the adapter moves
    desirable answers up and undesirable ones down)."""

    name, unit, metrics = "kto", "rows", ("kl", "signed_reward", "logp")

    def batch(self, plan, data, examples, pad_id: int) -> PairBatch:
        batch = super().batch(plan, data, examples, pad_id)
        batch.labels = torch.from_numpy(data.labels[batch.examples])
        return batch

    def forward(self, module: torch.nn.Module, batch: PairBatch) -> LossSum:
        sums, _, reference = batch.sequence_reference(module)
        (policy, policy_kl), (ref, ref_kl) = sums.chunk(2), reference.chunk(2)
        cfg = self.cfg
        out = kto_loss(
            policy, ref, batch.labels, kl_estimate(policy_kl, ref_kl), cfg.beta, cfg.desirable_weight,
            cfg.undesirable_weight,
        )  # fmt: skip
        signed = torch.where(out.labels, out.rewards, -out.rewards)
        sums = {"kl": out.kl * len(batch.labels), "signed_reward": signed.sum(), "logp": policy.detach().sum()}
        return LossSum(out.losses.sum(), {name: float(v) for name, v in sums.items()})


OBJECTIVES = {"sft": SFT, "dpo": DPO, "orpo": ORPO, "simpo": SimPO, "kto": KTO}


def objective_for(cfg) -> Objective:
    """The objective a run trains for (the config's `objective`)."""
    return SFT() if cfg.objective == "sft" else OBJECTIVES[cfg.objective](cfg)
