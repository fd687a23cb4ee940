"""How examples become optimizer steps and forward passes: one object, asked by everything that needs to know.

Training, validation, `loratune eval`, the memory planner and `data inspect` all go through `StepPlan`, so the
passes the planner sizes and the padding inspect reports are the passes training makes.

An optimizer step always takes `batch_size x gradient_accumulation_steps` examples (x processes), in the same
order whether or not we pack: the effective batch means what the Training Guide says. Inside a step the
examples are regrouped for speed, which changes nothing in the update because the step's loss is normalised
by the step's total target-token count:
- packing: a pass is one row of examples back to back, with no padding, holding at most `batch_size` times the
  data's longest example in tokens: the size of the largest padded batch, so memory peaks no higher than
  padding would, while each pass is full. A step takes as few such passes of about equal token count as hold
  its examples, at most `gradient_accumulation_steps` of them; every pass costs a fixed time beyond its tokens'
  (most of a pass of a short row on a small model), so fewer, fuller passes are faster;
- no packing: sorted by length and cut into passes of `batch_size` examples, so padding stays small.
With several processes a step's passes are dealt out in turn, each process taking as many.

On a CPU with a 16-bit base, packed rows are filled up to a few fixed sizes (`batching.shape_bucket`): oneDNN,
which runs those matrix products, compiles a kernel for every new shape, and an exact row length would be new
every pass.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..core.config import TrainConfig
from .batching import Batch, collate_packed, collate_padded, shape_bucket


@dataclass(frozen=True)
class PassShape:
    """One forward pass: its token positions (padding and filler included), tokens with loss, rows, and examples."""

    tokens: int
    targets: int
    rows: int
    examples: tuple[int, ...] = ()


@dataclass(frozen=True, eq=False)
class StepPlan:
    """The steps and passes of one set of examples (`lengths` and `targets`, tokens and loss tokens per example).

    `micro_batch` is the Training Guide's `batch_size`: examples per padded pass, or the packed pass's token budget
    in units of the data's longest example. It may be halved during a run (after running out of memory) while
    `examples_per_step` stays, so every step keeps its examples and its update.
    """

    lengths: np.ndarray
    targets: np.ndarray
    examples_per_step: int  # batch_size x gradient_accumulation_steps x processes
    micro_batch: int
    packing: bool = True
    processes: int = 1
    buckets: bool = False  # fill packed rows up to `shape_bucket` sizes (CPU, 16-bit base)
    seed: int = 0
    repeats: int = 1  # optimizer steps on each step's examples in a row (grpo's updates_per_generation)
    group: int = 1  # sequences an example becomes in its pass (grpo: a prompt's num_generations answers)
    pair_widths: np.ndarray | None = None  # preference items: the longer of their two sequences, two padded rows

    @property
    def accumulation(self) -> int:
        """Passes per step and process, at most (a packed step may take fewer)."""
        return math.ceil(self.examples_per_step / self.processes / self.micro_batch)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.lengths) / self.examples_per_step) * self.repeats

    @property
    def token_budget(self) -> int:
        """Most tokens in a packed pass: the size of the largest padded pass of `micro_batch` examples."""
        return self.micro_batch * int(self.lengths.max(initial=1))

    def with_micro_batch(self, micro_batch: int) -> StepPlan:
        """The same steps in passes of another size (the update does not change)."""
        return replace(self, micro_batch=micro_batch)

    def micro_batches(self) -> list[int]:
        """The micro-batches a step may be split into, largest first: the divisors of a process's share of a step,
        so that padded passes are equal and the effective batch stays exact."""
        share = self.examples_per_step // self.processes
        return [d for d in range(share, 0, -1) if share % d == 0]

    def smaller(self) -> int | None:
        """The one rule for a smaller micro-batch (`batch_size: auto` on a GPU, a step that ran out of memory): the
        next of `micro_batches` below this one; None at 1."""
        return next((b for b in self.micro_batches() if b < self.micro_batch), None)

    # --- Steps and passes ---------------------------------------------------------------------------------

    def epoch(self, epoch: int) -> list[np.ndarray]:
        """The epoch's examples in a seeded random order, cut into optimizer steps (the last one may be smaller)."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.lengths))
        steps = [order[i : i + self.examples_per_step] for i in range(0, len(order), self.examples_per_step)]
        return [step for step in steps for _ in range(self.repeats)]

    def passes(self, step: np.ndarray) -> list[list[int]]:
        """A step's examples as forward passes, as many for each process (some may be empty when the step is
        short); process r takes passes r, r + processes, ..."""
        world = self.processes
        if not self.packing:
            ordered = sorted(step.tolist(), key=lambda i: (self.lengths[i], i))
            passes = [ordered[i : i + self.micro_batch] for i in range(0, len(ordered), self.micro_batch)]
            return passes + [[] for _ in range(-len(passes) % world)]
        budget = self.token_budget
        n_passes = world * math.ceil(math.ceil(int(self.lengths[step].sum()) / budget) / world)
        while True:  # the fewest passes whose balanced loads fit the budget (one or two tries in practice)
            passes, heaviest = _balanced(step, self.lengths, n_passes)
            if heaviest <= budget or n_passes >= len(step):
                return passes
            n_passes += world

    def shape(self, examples) -> PassShape:
        """The size of the pass that holds these examples."""
        examples = tuple(int(i) for i in examples)
        if not examples:
            return PassShape(0, 0, 0)
        lengths = self.lengths[list(examples)]
        targets = int(self.targets[list(examples)].sum()) * self.group
        if not self.packing:
            if self.pair_widths is None:
                rows, width = len(examples) * self.group, int(lengths.max())
            else:  # each item's two sequences are rows of their own, padded to the pass's longest
                rows, width = 2 * len(examples), int(self.pair_widths[list(examples)].max())
            return PassShape(rows * width, targets, rows, examples)
        tokens = int(lengths.sum()) * self.group
        return PassShape(shape_bucket(tokens) if self.buckets else tokens, targets, 1, examples)

    def first_epoch_passes(self) -> list[PassShape]:
        """Every non-empty pass of the first epoch, all processes'."""
        return [self.shape(p) for step in self.epoch(0) for p in self.passes(step) if p]

    def largest_pass(self, cost: Callable[[PassShape], float]) -> PassShape:
        """The pass of the first epoch that costs most (the memory planner's cost: its peak memory)."""
        return max(self.first_epoch_passes(), key=cost)

    def padding_share(self) -> float:
        """Share of the positions of the first epoch's passes that hold no example's token."""
        passes = self.first_epoch_passes()
        real = sum(int(self.lengths[list(p.examples)].sum()) * self.group for p in passes)
        total = sum(p.tokens for p in passes)
        return 1 - real / total if total else 0.0

    def eval_passes(self, rank: int = 0) -> list[np.ndarray]:
        """Passes for measuring a loss over all examples once (validation, eval): this process's share, sorted by
        length so that padded passes hold similar lengths; packed passes fill up to the token budget."""
        order = np.argsort(self.lengths, kind="stable")[rank :: self.processes]
        if not self.packing:
            return [order[i : i + self.micro_batch] for i in range(0, len(order), self.micro_batch)]
        groups, start, tokens = [], 0, 0
        for k, i in enumerate(order):
            if tokens + self.lengths[i] > self.token_budget and k > start:
                groups.append(order[start:k])
                start, tokens = k, 0
            tokens += int(self.lengths[i])
        return groups + [order[start:]] if start < len(order) else groups

    def batch(self, data, examples, pad_id: int) -> Batch:
        """The tensors of the pass of these examples of a tokenized set (`data.input_ids`, `data.labels`)."""
        ids, labels = [data.input_ids[i] for i in examples], [data.labels[i] for i in examples]
        if self.packing:
            return collate_packed(ids, labels, pad_id if self.buckets else None)
        return collate_padded(ids, labels, pad_id)


def _balanced(step: np.ndarray, lengths: np.ndarray, n_passes: int) -> tuple[list[list[int]], int]:
    """Longest-first onto the lightest pass: the passes end up within one example's length of each other."""
    ordered = sorted(step.tolist(), key=lambda i: (-lengths[i], i))
    heap = [(0, p) for p in range(n_passes)]
    passes: list[list[int]] = [[] for _ in range(n_passes)]
    for i in ordered:
        tokens, p = heapq.heappop(heap)
        passes[p].append(i)
        heapq.heappush(heap, (tokens + int(lengths[i]), p))
    return passes, max(tokens for tokens, _ in heap)


def wants_shape_buckets(device: torch.device | str, dtype: torch.dtype) -> bool:
    """CPU products of 16-bit numbers run in oneDNN; fp32 ones in a BLAS (MKL, OpenBLAS) that has no such cost."""
    return torch.device(device).type == "cpu" and dtype in (torch.bfloat16, torch.float16)


# batch_size auto keeps the effective batch of the Training Guide's default batch size.
DEFAULT_BATCH_SIZE = TrainConfig.model_fields["batch_size"].default


def plan_for(
    cfg: TrainConfig,
    lengths: np.ndarray,
    targets: np.ndarray,
    *,
    packing: bool,
    processes: int = 1,
    buckets: bool = False,
    pair_widths: np.ndarray | None = None,
) -> StepPlan:
    """The plan `cfg` asks for over these examples (`batch_size: auto` planned at the default batch size);
    `pair_widths` for preference items (`PairSet.pair_widths`)."""
    micro = DEFAULT_BATCH_SIZE if cfg.batch_size == "auto" else cfg.batch_size
    return StepPlan(
        lengths,
        targets,
        micro * cfg.gradient_accumulation_steps * processes,
        micro,
        packing,
        processes,
        buckets,
        cfg.seed,
        cfg.updates_per_generation,
        cfg.num_generations if cfg.objective == "grpo" else 1,
        pair_widths,
    )


def max_length_plan(cfg: TrainConfig, *, packing: bool, processes: int = 1, buckets: bool = False) -> StepPlan:
    """The plan of one step of examples of `max_length` tokens, all of them targets: the worst case, for plans
    made without the data."""
    micro = DEFAULT_BATCH_SIZE if cfg.batch_size == "auto" else cfg.batch_size
    lengths = np.full(micro * cfg.gradient_accumulation_steps * processes, cfg.max_length)
    return plan_for(cfg, lengths, lengths, packing=packing, processes=processes, buckets=buckets)
