"""What a run trains for: the objective turns a step's examples into passes' tensors and each pass into a sum of
losses, and says how many units (target tokens, pairs, sampled answers) the step's loss is the mean over.

The loop and the step never ask which objective runs: they call `start_step` (which gives the step's count), then
`batch` and `forward` for each pass, back-propagate `loss / count` of the whole step (all passes and processes),
and log the mean of each metric the same way, so every objective's update is the same for any split of a step.
SFT is the first objective; the preference losses (pairs of answers) and GRPO (groups of sampled answers) are
other subclasses here, their modules beside `loss.py`.

`start_step` exists for GRPO: before its passes a step samples its answers (with the weights the step starts from),
and only then is its count known when the loss is a mean over answer tokens. The others' `start_step` is `count`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from ..data.batching import Batch
from ..data.reference_cache import ReferenceCache
from ..data.rewards import rewards_for
from .generate import generate_ids, until_end
from .grpo import (
    Group,
    GroupForward,
    answer_batch,
    answer_of_tokens,
    answer_sums,
    normalised_loss,
    sample_answers,
    score_groups,
    token_loss,
)
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
    target_logprobs,
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

    def start_step(self, module, plan, data, examples, passes: list[list[int]], step: int, all_sum) -> int:
        """Before a step's passes (again when the step is replayed with smaller passes): what the objective does
        for the whole step first, given this process's `passes` of the step's `examples`, the unwrapped `module`,
        the steps done and the engine's sum over processes; returns the step's count, all processes'."""
        return self.count(plan, examples)

    def batch(self, plan, data, examples, pad_id: int):
        """The tensors of the pass of these examples, laid out as the plan says (packed or padded)."""
        return plan.batch(data, examples, pad_id)

    def use_stored(self, data, identity) -> None:
        """Before training: take what earlier runs of the same `identity()` (model, reference, number format,
        device) computed and left on disk, to skip it; nothing for objectives that keep nothing."""

    def keep(self, data) -> None:
        """At a checkpoint and at the end: leave on disk what a later run may reuse (see `use_stored`)."""


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


class _SequencesPass:
    """A pass whose tensors are `sequences` (a `Batch`) with more beside them: the step's view of its size."""

    sequences: Batch

    @property
    def input_ids(self) -> torch.Tensor:
        return self.sequences.input_ids

    @property
    def n_tokens(self) -> int:
        return self.sequences.n_tokens

    @property
    def n_targets(self) -> int:
        return self.sequences.n_targets


@dataclass
class PairBatch(_SequencesPass):
    """A preference pass: its sequences (every item's first, then every item's second: chosen then rejected, or
    KTO's rows then their mismatched pairs), the items, the reference's log-probabilities of the sequences when
    the set has them all, and KTO's labels (desirable or not)."""

    sequences: Batch
    examples: np.ndarray
    cache: np.ndarray  # the set's reference log-probabilities [items, 2], NaN where not computed yet
    reference: torch.Tensor | None = None
    labels: torch.Tensor | None = None

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

    def use_stored(self, data, identity) -> None:
        """The reference log-probabilities, kept on disk in the loratune cache (`data.reference_cache`)."""
        if self.reference:
            cache = ReferenceCache.of(*identity())
            for pairs in (data.train, data.val):
                pairs.use_stored(cache)

    def keep(self, data) -> None:
        for pairs in (data.train, data.val):
            pairs.keep()

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


# --- GRPO: a step's prompts, each with num_generations sampled answers scored by reward functions (`grpo`'s
# definitions, checked against TRL's GRPOTrainer in tests/test_grpo.py).


@dataclass
class GroupBatch(_SequencesPass):
    """A GRPO pass: its prompts' answers as padded sequences (a prompt's group together), each answer's advantage,
    its tokens' log-probabilities when sampled (with `updates_per_generation` > 1), and per-answer metrics."""

    sequences: Batch
    advantages: torch.Tensor
    old: torch.Tensor | None
    stats: dict[str, torch.Tensor]

    def to(self, device) -> GroupBatch:
        old = self.old.to(device) if self.old is not None else None
        return GroupBatch(self.sequences.to(device), self.advantages.to(device), old, self.stats)


@dataclass
class PromptBatch:
    """Validation's pass: prompts answered greedily, once each, and scored."""

    data: object  # data.prompts.PromptSet
    examples: list[int]

    def to(self, device) -> PromptBatch:
        return self


class GRPO(Objective):
    """Sampled answers' clipped surrogate loss with a KL penalty (modeling.grpo). A step samples its answers in
    `start_step`, with the weights it starts from; validation is minus the mean reward of greedy answers."""

    name = "grpo"

    def __init__(self, cfg, encoder, rewards=None):
        self.cfg, self.encoder = cfg, encoder
        self.rewards = rewards if rewards is not None else rewards_for(cfg)
        self.unit = "answer tokens" if cfg.grpo_loss == "token" else "sampled answers"
        names = tuple(f"reward_{n}" for n in self.rewards.names)
        self.metrics = ("reward", "reward_std", *names, "kl", "completion_length", "clipped", "zero_std_groups")
        self.groups: dict[int, Group] = {}  # this process's prompts of the step, by example
        self.sampled: tuple | None = None  # (data, generation, examples) the groups hold
        self.scale = 1.0  # the step's units per answer: metric sums are scaled so their means are per answer

    def module(self, peft_model, shape_buckets: bool = False) -> torch.nn.Module:
        return GroupForward(peft_model, self.cfg.temperature, self.cfg.grpo_beta > 0)

    def count(self, plan, examples) -> int:
        return len(examples)  # validation: one greedy answer per prompt

    def start_step(self, module, plan, data, examples, passes: list[list[int]], step: int, all_sum) -> int:
        """Sample this process's answers (kept for `updates_per_generation` steps); the step's answers or answer
        tokens."""
        mine = sorted(i for p in passes for i in p)
        key = (id(data), step // self.cfg.updates_per_generation, tuple(mine))
        if key != self.sampled:
            self.groups = self._sample(module, data, mine, key[1], plan.micro_batch) if mine else {}
            self.sampled = key
        answers = len(examples) * self.cfg.num_generations
        units = answers
        if self.cfg.grpo_loss == "token":
            units = int(all_sum(float(sum(len(a) for g in self.groups.values() for a in g.answers))))
        self.scale = units / answers
        return units

    def _sample(self, module, data, examples: list[int], generation: int, micro_batch: int) -> dict[int, Group]:
        cfg, enc, group = self.cfg, self.encoder, self.cfg.num_generations
        prompts = [data.items[i].ids for i in examples]
        keys = [(cfg.seed, generation, i) for i in examples]
        pad = enc.tok.pad_token_id
        answers = sample_answers(module.model, prompts, keys, cfg, enc.end_ids, pad, micro_batch)
        texts = [enc.tok.decode(until_end(a, enc.end_ids), skip_special_tokens=True).strip() for a in answers]
        asked = [data.items[i].text for i in examples for _ in range(group)]
        scored = score_groups(self.rewards, asked, texts, data.columns(examples, group), list(map(len, answers)), group)
        groups = {i: Group(answers[k * group : (k + 1) * group], *scored[k]) for k, i in enumerate(examples)}
        if cfg.updates_per_generation > 1:  # later steps clip against the policy that sampled
            for i in examples:
                groups[i].old = _answer_logprobs(module, [data.items[i].ids] * group, groups[i].answers, pad)
        return groups

    def batch(self, plan, data, examples, pad_id: int) -> GroupBatch | PromptBatch:
        examples = [int(i) for i in examples]
        if self.sampled is None or self.sampled[0] != id(data) or not all(i in self.groups for i in examples):
            return PromptBatch(data, examples)
        groups = [self.groups[i] for i in examples]
        prompts = [data.items[i].ids for i in examples for _ in range(self.cfg.num_generations)]
        answers = [a for g in groups for a in g.answers]
        join = lambda f: torch.from_numpy(np.concatenate([f(g) for g in groups]).astype(np.float64))  # noqa: E731
        stats = {
            "reward": join(lambda g: g.rewards),
            "reward_std": join(lambda g: g.std),
            **{f"reward_{n}": join(lambda g, n=n: g.scores[n]) for n in self.rewards.names},
            "completion_length": torch.tensor([len(a) for a in answers], dtype=torch.float64),
            "zero_std_groups": join(lambda g: g.zero_std),
        }
        old = torch.cat([t for g in groups for t in g.old]) if groups[0].old is not None else None
        return GroupBatch(answer_batch(prompts, answers, pad_id), join(lambda g: g.advantages).float(), old, stats)

    def forward(self, module: torch.nn.Module, batch: GroupBatch | PromptBatch) -> LossSum:
        if isinstance(batch, PromptBatch):
            return self._greedy_reward(module, batch)
        cfg, n = self.cfg, len(batch.advantages)
        logps, reference, rows = module(batch.sequences)
        answer = answer_of_tokens(batch.sequences, rows)
        old = batch.old if batch.old is not None else logps.detach()
        out = token_loss(logps, old, reference, batch.advantages[answer], cfg.grpo_beta, cfg.epsilon)
        lengths = torch.bincount(answer, minlength=n)
        loss = normalised_loss(out.losses, answer, lengths, cfg.grpo_loss, cfg.max_new_tokens)
        per_answer = lambda v: answer_sums(v.float(), answer, n) / lengths.clamp(min=1)  # noqa: E731
        stats = batch.stats | {"kl": per_answer(out.kl), "clipped": per_answer(out.clipped)}
        return LossSum(loss, {name: float(v.double().sum()) * self.scale for name, v in stats.items()})

    def _greedy_reward(self, module, batch: PromptBatch) -> LossSum:
        """Minus the summed reward of greedy answers (the validation loss is minus their mean reward)."""
        enc, items = self.encoder, [batch.data.items[i] for i in batch.examples]
        answers = generate_ids(
            module.model, [x.ids for x in items], enc.end_ids, enc.tok.pad_token_id, self.cfg.max_new_tokens, len(items)
        )
        texts = [enc.tok.decode(until_end(a, enc.end_ids), skip_special_tokens=True).strip() for a in answers]
        totals, scores = self.rewards(
            [x.text for x in items], texts, batch.data.columns(batch.examples), list(map(len, answers))
        )
        sums = {"reward": float(np.sum(totals))} | {f"reward_{n}": float(np.sum(s)) for n, s in scores.items()}
        return LossSum(torch.tensor(-sums["reward"]), sums)


def _answer_logprobs(module, prompts: list[list[int]], answers: list[list[int]], pad_id: int) -> list[torch.Tensor]:
    """Each answer's tokens' log-probabilities under the adapter now (no gradient, no dropout), on the CPU."""
    batch = answer_batch(prompts, answers, pad_id).to(next(module.parameters()).device)
    was_training = module.training
    module.eval()
    with torch.no_grad():
        logps, rows = target_logprobs(module.model, batch, module.temperature)
    module.train(was_training)
    return list(logps.cpu().split(torch.bincount(answer_of_tokens(batch, rows), minlength=len(answers)).tolist()))


OBJECTIVES = {"sft": SFT, "dpo": DPO, "orpo": ORPO, "simpo": SimPO, "kto": KTO}


def objective_for(cfg, encoder=None) -> Objective:
    """The objective a run trains for (the config's `objective`); GRPO samples and decodes with the `encoder`'s
    tokenizer and end tokens."""
    if cfg.objective == "grpo":
        return GRPO(cfg, encoder)
    return SFT() if cfg.objective == "sft" else OBJECTIVES[cfg.objective](cfg)
