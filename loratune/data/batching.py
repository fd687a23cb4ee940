"""The tensors of one forward pass: packed rows or padded rows of tokenized examples.

Which examples go into which pass is `plan.StepPlan`'s business; this module only lays them out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .encode import IGNORE


def shape_bucket(n: int, per_octave: int = 16) -> int:
    """n rounded up to one of `per_octave` sizes per power of two: at most 1/per_octave more, and few distinct
    sizes in a run.

    oneDNN's 16-bit matrix products compile a kernel per shape (measured: 0.5-0.8 ms per new row count, 10x a
    rank-8 product's own time); with rows of these sizes the kernels of earlier passes are reused.
    """
    step = 1 << max(0, n.bit_length() - per_octave.bit_length())
    return -(-n // step) * step


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
