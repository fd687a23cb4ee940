"""`loratune plan`: the memory plan and time per epoch of a run, from the model's config and the tokenized data
alone (no weights are loaded). Also the peak memory `data inspect` shows per max_length."""

from __future__ import annotations

import torch

from ..core.config import TrainConfig
from ..core.device import DTYPES, choose_dtype, resolve_device
from ..data.encode import encoder_for
from ..data.prepare import prepare
from ..memory.arithmetic import FSDP2_SHARDS, ZERO3_SHARDS, MemoryModel
from ..memory.planner import MemoryPlan, device_budget, estimate, peak
from ..memory.shape import read_shape
from ..memory.throughput import measured_throughput, rough_throughput
from ..modeling.model import four_bit_config, load_tokenizer, resolve_model
from ..planning.resolved import resolve


def plan_run(
    cfg: TrainConfig,
    *,
    gpu_memory: int | None = None,
    device: str | None = None,
    tokens_per_second: float | None = None,
    processes: int = 1,
    fsdp: bool = False,
    zero3: bool = False,
) -> MemoryPlan:
    """Plan cfg's run without loading weights: the model's config, the tokenized training data (when given), the
    device's memory (`gpu_memory`: a GPU of that size, not this machine's), and the throughput for the time.
    With `processes` > 1 the plan is one device's: its share of each step, and with `fsdp` (or `zero3`) its
    shards. The run is worked out by the resolver training uses; the plan carries its record under `resolved`."""
    sharding = ZERO3_SHARDS if zero3 else FSDP2_SHARDS if fsdp else None
    engine = sharding.name if sharding else "DDP" if processes > 1 else "single process"
    mm, model_path, target = _memory_model(cfg, gpu_memory, device, processes if sharding else 1, sharding)
    budget = device_budget(cfg, mm.device, gpu_memory)
    train, val = _data(cfg, model_path)
    resolved, _ = resolve(cfg, mm, budget, device=target, train=train, val=val, engine=engine, processes=processes)
    plan = resolved.plan
    source, likely = "given", None
    if tokens_per_second is None:
        tokens_per_second, source = measured_throughput(cfg), f"measured in {cfg.output_dir}/metrics.jsonl"
    if tokens_per_second is None and (gpu_memory is None or device is not None):
        from_data = train is not None
        mean = float(plan.lengths.mean()) if from_data else cfg.max_length
        share = float(plan.targets.sum() / plan.lengths.sum()) if from_data else 1.0
        low, tokens_per_second, high = rough_throughput(mm, mean, share)
        source, likely = f"rough: from a matrix-product benchmark on this {mm.device}", (low, high)
    memory = estimate(
        cfg,
        mm,
        plan,
        budget,
        from_data=train is not None,
        tokens_per_second=tokens_per_second,
        throughput_source=source,
        throughput_range=likely,
    )
    memory.resolved = resolved.record()
    return memory


def peak_bytes(cfg: TrainConfig) -> int:
    """Estimated peak memory of training with cfg on the device it would use, for passes of batch_size x
    max_length tokens (the micro-batch the resolver picks when auto)."""
    mm, _, target = _memory_model(cfg)
    budget = device_budget(cfg, mm.device)
    resolved, _ = resolve(cfg, mm, budget, device=target)
    return peak(mm, resolved.plan, budget)


def _data(cfg: TrainConfig, model_path: str):
    """The tokenized training and validation sets training would make (tokenizer only, no weights); None without
    training data (the plan is then of examples of max_length)."""
    if not cfg.train_data:
        return None, None
    data = prepare(cfg, encoder_for(load_tokenizer(model_path), cfg))
    return data.train, data.val if len(data.val) else None


def _memory_model(
    cfg: TrainConfig, gpu_memory: int | None = None, device: str | None = None, shards: int = 1, sharding=None
):
    """The memory model of cfg's run on the device a plan is for (refusing 4-bit loading off CUDA), the model
    folder, and the device."""
    if gpu_memory is not None and device is None:  # a GPU that may not be here: plan as training would pick
        target = torch.device("cuda")
        dtype = torch.bfloat16 if cfg.precision == "auto" else DTYPES[cfg.precision]
    else:
        target = resolve_device(device or cfg.device)
        dtype = choose_dtype(cfg.precision, target)
    if cfg.load_in_4bit and target.type != "cuda":
        four_bit_config(target, dtype)  # raises the refusal training would give
    model_path = resolve_model(cfg.model)
    mm = MemoryModel.for_run(cfg, read_shape(model_path, cfg), target, dtype, shards, sharding)
    return mm, model_path, target
