"""What a run trains for: the objective turns a step's examples into passes' tensors and each pass into a sum of
losses, and says how many units (target tokens, pairs, sampled answers) the step's loss is the mean over.

The loop and the step never ask which objective runs: they call `batch`, `forward` and `count`, back-propagate
`loss / count` of the whole step (all passes and processes), and log the mean of each metric the same way, so
every objective's update is the same for any split of a step. SFT is the first objective; a preference loss
(pairs of answers) or GRPO (groups of sampled answers) is another subclass here, its module beside `loss.py`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .loss import CausalLMLoss


class LossSum(NamedTuple):
    """One pass: the loss summed over its units, and other per-unit quantities summed the same way."""

    loss: torch.Tensor
    metrics: dict[str, float]


class Objective:
    name: str
    unit: str  # what a step's loss is the mean over

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


def objective_for(cfg) -> Objective:
    """The objective a run trains for: SFT until the config names others."""
    return SFT()
