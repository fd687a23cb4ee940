"""Measured memory of a training pass, for the tests and the memory benchmark (docs/memory-accuracy.md)."""

from __future__ import annotations

import numpy as np
import torch

from loratune.core.config import TrainConfig
from loratune.data.batching import collate_packed, collate_padded
from loratune.data.encode import IGNORE
from loratune.modeling.adapter import trainable_model
from loratune.modeling.loss import CausalLMLoss


def measure_peak(fn, device: torch.device | str) -> int:
    """Peak increase of allocated memory while `fn()` runs, in bytes.

    CUDA: `torch.cuda.max_memory_allocated` over the call. CPU: the CPU allocator's running total, replayed from
    the profiler's allocation events (every allocation and free the allocator makes, with the total after each);
    unlike the process's resident size it is not blurred by the C allocator keeping freed pages.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == device.type:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def measure_pass(base, cfg: TrainConfig, lengths: list[int], answer_share: float = 1.0, seed: int = 0):
    """Measured peak increase of allocated memory in one forward + backward pass, set up as training sets it up;
    returns it with the pass's Batch (for `MemoryModel.batch_bytes`).

    `base` is a loaded transformers model (any weights); it gets cfg's LoRA, attention and checkpointing. The pass
    holds random examples of these lengths whose last `answer_share` of tokens carry loss. One pass runs first, so
    the adapters' gradients already exist, as in every pass of a step after the first.
    """
    model, packing, _ = trainable_model(base, cfg, cfg.packing)
    loss = CausalLMLoss(model).train()
    rng = np.random.default_rng(seed)
    ids = [rng.integers(0, base.config.get_text_config().vocab_size, n) for n in lengths]
    labels = [np.where(np.arange(len(x)) >= len(x) * (1 - answer_share), x, IGNORE) for x in ids]
    batch = collate_packed(ids, labels) if packing else collate_padded(ids, labels, pad_id=0)
    batch = batch.to(base.device)
    loss(batch).backward()
    return measure_peak(lambda: loss(batch).backward(), base.device), batch
