"""Which examples go into which optimizer step and forward pass, and the tensors for each pass.

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

On a CPU with a 16-bit base, packed rows are padded up to a few fixed sizes (`shape_bucket`): oneDNN, which runs
those matrix products, compiles a kernel for every new shape, and an exact row length would be new every pass.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np
import torch

from .encode import IGNORE


def epoch_steps(n_examples: int, per_step: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The epoch's examples in a seeded random order, cut into optimizer steps (the last one may be smaller)."""
    order = np.random.default_rng([seed, epoch]).permutation(n_examples)
    return [order[i : i + per_step] for i in range(0, n_examples, per_step)]


def split_step(
    step: np.ndarray, lengths: np.ndarray, batch_size: int, packing: bool, longest: int, world_size: int = 1
) -> list[list[int]]:
    """A step's examples as forward passes, as many for each of `world_size` processes (some may be empty when the
    step is short). `longest`: the data's longest example in tokens, which sets a packed pass's token budget."""
    if not packing:
        ordered = sorted(step.tolist(), key=lambda i: (lengths[i], i))
        passes = [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
        return passes + [[] for _ in range(-len(passes) % world_size)]  # each process does as many
    budget = batch_size * longest
    n_passes = world_size * math.ceil(math.ceil(int(lengths[step].sum()) / budget) / world_size)
    while True:  # the fewest passes whose balanced loads fit the budget (one or two tries in practice)
        passes, heaviest = _balanced(step, lengths, n_passes)
        if heaviest <= budget or n_passes >= len(step):
            return passes
        n_passes += world_size


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


def packed_groups(order: np.ndarray, lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Examples in this order cut into packed passes of at most `batch_size` times the data's longest example."""
    budget, groups, start, tokens = batch_size * int(lengths.max(initial=1)), [], 0, 0
    for k, i in enumerate(order):
        if tokens + lengths[i] > budget and k > start:
            groups.append(order[start:k])
            start, tokens = k, 0
        tokens += int(lengths[i])
    return groups + [order[start:]] if start < len(order) else groups


def shape_bucket(n: int, per_octave: int = 16) -> int:
    """n rounded up to one of `per_octave` sizes per power of two: at most 1/per_octave more, and few distinct
    sizes in a run.

    oneDNN's 16-bit matrix products compile a kernel per shape (measured: 0.5-0.8 ms per new row count, 10x a
    rank-8 product's own time); with rows of these sizes the kernels of earlier passes are reused.
    """
    step = 1 << max(0, n.bit_length() - per_octave.bit_length())
    return -(-n // step) * step


def wants_shape_buckets(device: torch.device, dtype: torch.dtype) -> bool:
    """CPU products of 16-bit numbers run in oneDNN; fp32 ones in a BLAS (MKL, OpenBLAS) that has no such cost."""
    return device.type == "cpu" and dtype in (torch.bfloat16, torch.float16)


@dataclass
class Batch:
    """One forward pass. `targets[t]` is the token position t must predict (IGNORE where none)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    attention_mask: torch.Tensor | None = None  # padded batches only
    cu_seqlens: torch.Tensor | None = None  # packed rows only
    max_seqlen: int = 0
    padding: int = 0  # packed rows: tokens of the filler segment at the end (see `shape_bucket`)

    @property
    def n_targets(self) -> int:
        return int((self.targets != IGNORE).sum())

    @property
    def n_tokens(self) -> int:
        if self.attention_mask is not None:
            return int(self.attention_mask.sum())
        return self.input_ids.numel() - self.padding

    def to(self, device) -> Batch:
        move = lambda t: t.to(device, non_blocking=True) if t is not None else None  # noqa: E731
        return Batch(
            move(self.input_ids),
            move(self.position_ids),
            move(self.targets),
            move(self.attention_mask),
            move(self.cu_seqlens),
            self.max_seqlen,
            self.padding,
        )


def _shifted(labels: np.ndarray) -> np.ndarray:
    """Position t predicts token t+1, inside the example only: the last position predicts nothing."""
    out = np.full_like(labels, IGNORE)
    out[:-1] = labels[1:]
    return out


def collate_packed(ids: list[np.ndarray], labels: list[np.ndarray], pad_id: int | None = None) -> Batch:
    """One row of examples back to back; position ids restart at each example, which marks the boundaries.

    With a `pad_id`, the row is filled up to `shape_bucket` of its length by one more segment of pad tokens that
    carries no loss: like every example, it attends only to itself, so the examples' results do not change.
    """
    length = sum(len(x) for x in ids)
    padding = shape_bucket(length) - length if pad_id is not None else 0
    if padding:
        ids, labels = [*ids, np.full(padding, pad_id)], [*labels, np.full(padding, IGNORE)]
    position_ids = torch.from_numpy(np.concatenate([np.arange(len(x)) for x in ids]))[None]
    return Batch(
        input_ids=torch.from_numpy(np.concatenate(ids))[None],
        position_ids=position_ids,
        targets=torch.from_numpy(np.concatenate([_shifted(y) for y in labels]))[None],
        cu_seqlens=packed_boundaries(position_ids),
        max_seqlen=max(len(x) for x in ids),
        padding=padding,
    )


def collate(data, indices, packing: bool, pad_id: int, buckets: bool = False) -> Batch:
    """The pass of these examples of a tokenized set: one packed row (filled to a bucket size with `buckets`),
    or padded rows."""
    ids, labels = [data.input_ids[i] for i in indices], [data.labels[i] for i in indices]
    return collate_packed(ids, labels, pad_id if buckets else None) if packing else collate_padded(ids, labels, pad_id)


def collate_padded(ids: list[np.ndarray], labels: list[np.ndarray], pad_id: int) -> Batch:
    """Examples as rows padded on the right; padding never carries loss (targets mark it, not the pad id)."""
    width = max(len(x) for x in ids)
    input_ids = np.full((len(ids), width), pad_id, dtype=np.int64)
    targets = np.full((len(ids), width), IGNORE, dtype=np.int64)
    mask = np.zeros((len(ids), width), dtype=np.int64)
    for row, (x, y) in enumerate(zip(ids, labels)):  # rows may be read-only views of the memory-mapped cache
        input_ids[row, : len(x)] = x
        targets[row, : len(x)] = _shifted(y)
        mask[row, : len(x)] = 1
    position_ids = torch.arange(width)[None].expand(len(ids), -1)
    return Batch(
        torch.from_numpy(input_ids), position_ids, torch.from_numpy(targets), attention_mask=torch.from_numpy(mask)
    )


def packed_boundaries(position_ids: torch.Tensor) -> torch.Tensor:
    """Example boundaries of a packed row from its restarting position ids: [0, end_1, end_2, ..., T]."""
    pos = position_ids.reshape(-1)
    starts = torch.nonzero(pos == 0).reshape(-1)
    total = torch.tensor([pos.numel()], device=pos.device)
    return torch.cat([starts, total]).to(torch.int32)
