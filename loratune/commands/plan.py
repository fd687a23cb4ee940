"""`loratune plan`: the memory plan and time per epoch of a run, from the model's config and the tokenized data
alone (no weights are loaded). Also the peak memory `data inspect` shows per max_length."""

from __future__ import annotations

import torch

from ..core.config import TrainConfig
from ..core.device import DTYPES, choose_dtype, resolve_device
from ..data.encode import encoder_for
from ..data.plan import StepPlan, max_length_plan, plan_for, wants_shape_buckets
from ..data.prepare import prepare
from ..memory.arithmetic import MemoryModel
from ..memory.planner import MemoryPlan, device_budget, estimate, peak
from ..memory.shape import read_shape
from ..memory.throughput import benchmark_throughput, measured_throughput
from ..modeling.model import four_bit_config, load_tokenizer, resolve_model


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
    shards."""
    sharding = "ZeRO-3" if zero3 else "FSDP2"
    mm, model_path = _memory_model(cfg, gpu_memory, device, processes if fsdp or zero3 else 1, sharding)
    plan = _step_plan(cfg, mm, model_path, processes)
    source = "given"
    if tokens_per_second is None:
        tokens_per_second, source = measured_throughput(cfg), f"measured in {cfg.output_dir}/metrics.jsonl"
    if tokens_per_second is None and (gpu_memory is None or device is not None):
        from_data = cfg.train_data is not None
        mean = float(plan.lengths.mean()) if from_data else cfg.max_length
        share = float(plan.targets.sum() / plan.lengths.sum()) if from_data else 1.0
        tokens_per_second = benchmark_throughput(mm, mean, share)
        source = f"rough: a matrix-product benchmark on this {mm.device}"
    budget = device_budget(cfg, mm.device, gpu_memory)
    return estimate(
        cfg,
        mm,
        plan,
        budget,
        from_data=cfg.train_data is not None,
        tokens_per_second=tokens_per_second,
        throughput_source=source,
    )


def peak_bytes(cfg: TrainConfig) -> int:
    """Estimated peak memory of training with cfg on the device it would use, for passes of batch_size x
    max_length tokens (the default batch size when auto)."""
    mm, _ = _memory_model(cfg)
    return peak(
        mm,
        max_length_plan(cfg, packing=cfg.packing and mm.shape.packs, buckets=_buckets(cfg, mm)),
        device_budget(cfg, mm.device),
    )


def _step_plan(cfg: TrainConfig, mm: MemoryModel, model_path: str, processes: int = 1) -> StepPlan:
    """The passes training would make: of the tokenized training data when given (tokenizer only, no weights),
    else of examples of max_length."""
    packing, buckets = cfg.packing and mm.shape.packs, _buckets(cfg, mm)
    if not cfg.train_data:
        return max_length_plan(cfg, packing=packing, buckets=buckets, processes=processes)
    train = prepare(cfg, encoder_for(load_tokenizer(model_path), cfg)).train
    return plan_for(cfg, train.lengths, train.target_counts, packing=packing, buckets=buckets, processes=processes)


def _buckets(cfg: TrainConfig, mm: MemoryModel) -> bool:
    return cfg.packing and mm.shape.packs and wants_shape_buckets(mm.device, mm.dtype)


def _memory_model(
    cfg: TrainConfig, gpu_memory: int | None = None, device: str | None = None, shards: int = 1, sharding: str = "FSDP2"
):
    """The memory model of cfg's run on the device a plan is for (refusing 4-bit loading off CUDA), and the model
    folder."""
    if gpu_memory is not None and device is None:  # a GPU that may not be here: plan as training would pick
        target = torch.device("cuda")
        dtype = torch.bfloat16 if cfg.precision == "auto" else DTYPES[cfg.precision]
    else:
        target = resolve_device(device or cfg.device)
        dtype = choose_dtype(cfg.precision, target)
    if cfg.load_in_4bit and target.type != "cuda":
        four_bit_config(target, dtype)  # raises the refusal training would give
    model_path = resolve_model(cfg.model)
    return MemoryModel.for_run(cfg, read_shape(model_path, cfg), target, dtype, shards, sharding), model_path
