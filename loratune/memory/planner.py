"""The memory plan of a run, before any weight is loaded: the itemised peak, whether it fits, the fixes when it does
not, and the choice of `batch_size: auto`.

Which pass is the largest comes from the run's `StepPlan` (data.plan), so the planner sizes the passes training
will make; what each item costs comes from `arithmetic.MemoryModel`.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..core.config import TrainConfig, parse_bytes
from ..core.device import KEPT_FREE_BYTES, cpu_runtime_bytes, dtype_name
from ..core.errors import UserError
from ..data.plan import PassShape, StepPlan
from .arithmetic import MEASURED_TYPES, GiB, MemoryModel

GENERATION_BATCH = 16  # held-out prompts answered together (generate_texts' default batch, training.outputs')
HEAP_FRAGMENTATION = 0.35  # share of a CPU pass's bytes left resident in the heap (fitted: docs/memory-accuracy.md)


@dataclass(frozen=True)
class Budget:
    """Memory the run may use, and where that figure came from."""

    bytes: int
    source: str
    detected: bool = False  # measured free CUDA memory: this process's context is already taken out of it


def device_budget(cfg: TrainConfig, device: torch.device | str, given: int | None = None) -> Budget:
    """The device's free memory (or `given`, e.g. plan's --gpu-memory), capped by cfg.max_memory."""
    device = torch.device(device)
    if given is not None:
        budget = Budget(given, f"{size_text(given)} given")
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = Budget(
            free, f"{size_text(free)} free of {size_text(total)} on {torch.cuda.get_device_name(device)}", True
        )
    elif device.type == "mps":
        limit = torch.mps.recommended_max_memory()
        budget = Budget(limit, f"{size_text(limit)}, the recommended maximum for this Mac's GPU")
    else:
        ram = _available_ram()
        budget = Budget(ram, f"{size_text(ram)} of available RAM")
    if cfg.max_memory and parse_bytes(cfg.max_memory) < budget.bytes:
        return Budget(parse_bytes(cfg.max_memory), f"max_memory {cfg.max_memory} (the device has {budget.source})")
    return budget


def _available_ram() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def size_text(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 4 else f"{n / 2**20:.1f} MiB"


@dataclass
class MemoryPlan:
    """An itemised estimate of a run's peak memory, whether it fits, and how long an epoch takes."""

    model: str
    device: str
    batch_size: int
    gradient_accumulation_steps: int
    largest_pass: dict
    items: dict[str, int]  # sum to total
    total: int
    budget: int | None
    budget_source: str
    fits: bool | None
    total_by_checkpointing: dict[str, int]  # "on" / "off"
    trainable_params: int
    total_params: int
    epoch_tokens: int | None = None
    tokens_per_second: float | None = None
    throughput_source: str = ""
    epoch_seconds: float | None = None
    epoch_seconds_range: tuple[float, float] | None = None  # shortest, longest, when the throughput is rough
    notes: list[str] = field(default_factory=list)
    fixes: list[str] = field(default_factory=list)
    resolved: dict = field(default_factory=dict)  # the run as training resolves it (planning.resolved)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def likely_text(self, scale: float = 1.0) -> str:
        """`, likely 54s to 1m57s` for the rough estimate's range of scale epochs; nothing when measured or given."""
        from ..core.console import format_seconds

        if not self.epoch_seconds_range:
            return ""
        shortest, longest = (scale * s for s in self.epoch_seconds_range)
        return f", likely {format_seconds(shortest)} to {format_seconds(longest)}"

    def text(self) -> str:
        from ..core.console import format_seconds

        p = self.largest_pass
        width = max(len(k) for k in self.items) + 2
        lines = [
            f"{self.model} on {self.device}: batch_size {self.batch_size} x gradient_accumulation_steps "
            f"{self.gradient_accumulation_steps}",
            f"largest forward pass: {p['tokens']:,} tokens in {p['rows']} row(s), {p['targets']:,} with loss "
            f"({p['source']})",
            "estimated peak memory:",
            *(f"  {k:<{width}}{size_text(v):>12}" for k, v in self.items.items()),
            f"  {'total':<{width}}{size_text(self.total):>12}",
        ]
        if self.fits is not None:
            spare = self.budget - self.total
            verdict = (
                f"fits ({size_text(spare)} to spare)" if self.fits else f"DOES NOT FIT ({size_text(-spare)} short)"
            )
            lines.append(f"device memory: {self.budget_source} -> {verdict}")
        on, off = self.total_by_checkpointing["on"], self.total_by_checkpointing["off"]
        lines.append(f"with gradient checkpointing {size_text(on)}, without {size_text(off)}")
        share = 100 * self.trainable_params / max(1, self.total_params)
        lines.append(f"trainable: {self.trainable_params:,} of {self.total_params:,} parameters ({share:.2f}%)")
        if self.epoch_seconds is not None:
            lines.append(
                f"time per epoch: about {format_seconds(self.epoch_seconds)}{self.likely_text()} "
                f"({self.epoch_tokens:,} tokens at {self.tokens_per_second:,.0f} tokens/s, {self.throughput_source})"
            )
        elif self.tokens_per_second:
            lines.append(
                f"throughput: {self.tokens_per_second:,.0f} tokens/s ({self.throughput_source}); "
                "give train_data for the time per epoch"
            )
        else:
            lines.append(
                "time per epoch: unknown; give --tokens-per-second" + ("" if self.epoch_tokens else " and train_data")
            )
        lines += [f"note: {n}" for n in self.notes]
        if self.fixes:
            lines.append("to make it fit, change one of:")
            lines += [f"  - {f}" for f in self.fixes]
        return "\n".join(lines)


def peak_items(mm: MemoryModel, size: PassShape, budget: Budget) -> tuple[dict[str, int], int]:
    """The itemised peak of a run with this model and largest pass, and its total."""
    b = mm.pass_bytes(size.tokens, size.targets, size.rows)
    items = dict(mm.static_bytes())
    checkpointed = ", checkpointed" if mm.checkpointing else ""
    items[f"activations, largest pass ({size.tokens:,} tokens{checkpointed})"] = b.activations
    working = "logits chunks and loss buffers" if b.loss_is_peak else "backward-pass gradients"
    items[f"working memory at the peak ({working})"] = b.working
    if mm.device == "cuda":  # a CPU process's own memory is in `process_items`
        items["framework overhead (CUDA context, allocator cache)"] = mm.overhead(sum(items.values()), budget.detected)
    return items, sum(items.values())


def largest_pass(mm: MemoryModel, plan: StepPlan) -> PassShape:
    """The pass of the plan with the highest peak."""
    return plan.largest_pass(lambda p: mm.pass_bytes(p.tokens, p.targets, p.rows).total)


def peak(mm: MemoryModel, plan: StepPlan, budget: Budget) -> int:
    """Estimated peak bytes of a run with this plan: at its largest pass."""
    return peak_items(mm, largest_pass(mm, plan), budget)[1]


def process_items(
    mm: MemoryModel, size: PassShape, training_peak: int, held_out: tuple[int, int, int] | None
) -> dict[str, int]:
    """What the process holds beyond training's tensors at its peak. On a CPU: Python, PyTorch and the libraries
    (measured once per machine); the freed memory glibc keeps for reuse (core.device.keep_freed_cpu_memory), plus
    the heap that the largest pass's tensors leave fragmented (a share of them, HEAP_FRAGMENTATION); and
    with test data (`held_out_batch`) the answers after training on top of it all: the freed activations stay in
    the heap while the prompts' logits, each above glibc's mmap threshold, take fresh pages. On a GPU the caching
    allocator reuses training's blocks: only what answering needs beyond training's peak."""
    items = {}
    if mm.device == "cpu":
        items["Python, PyTorch and libraries (measured once on this machine)"] = cpu_runtime_bytes()
        if sys.platform.startswith("linux"):
            fragmented = HEAP_FRAGMENTATION * mm.pass_bytes(size.tokens, size.targets, size.rows).total
            items["freed memory the C allocator keeps for reuse"] = KEPT_FREE_BYTES + int(fragmented)
    if held_out is not None:
        rows, prompt, new = held_out
        answering = mm.generation_bytes(rows, prompt, new)
        if mm.device != "cpu":
            answering = max(0, sum(mm.static_bytes().values()) + answering - training_peak)
        items[f"answering the held-out test ({rows} prompts of up to {prompt} tokens)"] = answering
    return items


def held_out_batch(cfg: TrainConfig) -> tuple[int, int, int] | None:
    """(prompts, longest prompt, answer budget in tokens) of the held-out test's widest generation batch, as
    training.outputs.answers makes them (shortest prompts first, in batches of 16); None without test data."""
    if not cfg.test_data:
        return None
    try:
        key = (cfg.model_dump_json(), os.stat(cfg.test_data).st_mtime)
    except OSError:  # not a file (a hub data set): read it each time
        return _held_out_batch(cfg)
    if key not in _HELD_OUT:
        _HELD_OUT[key] = _held_out_batch(cfg)
    return _HELD_OUT[key]


_HELD_OUT: dict = {}  # estimate and fixes ask for the same config's; so do a UI's plans


def _held_out_batch(cfg: TrainConfig) -> tuple[int, int, int] | None:
    from ..data.encode import encoder_for
    from ..data.prepare import read_examples
    from ..modeling.model import load_tokenizer, resolve_model

    try:
        tokenizer = load_tokenizer(resolve_model(cfg.model))
        encoder = encoder_for(tokenizer, cfg)
        examples = read_examples(cfg.test_data, "test", cfg)
    except (UserError, OSError):  # the plan of training alone; training itself stops on it
        return None
    prompts = sorted(len(encoder.prompt_ids(ex)) for ex in examples)
    new = max(len(tokenizer(encoder.reference(ex), add_special_tokens=False).input_ids) for ex in examples) + 16
    return min(len(prompts), GENERATION_BATCH), prompts[-1], new


def estimate(
    cfg: TrainConfig,
    mm: MemoryModel,
    plan: StepPlan,
    budget: Budget,
    *,
    from_data: bool,
    tokens_per_second: float | None = None,
    throughput_source: str = "",
    throughput_range: tuple[float, float] | None = None,
) -> MemoryPlan:
    """The memory plan of a run that makes `plan`'s passes (`from_data`: the data's own lengths, else examples of
    max_length) at the plan's micro-batch (`batch_size: auto` resolved already: planning.resolved), and its time
    per epoch when a throughput is given."""
    size = largest_pass(mm, plan)
    items, total = peak_items(mm, size, budget)
    held_out, by_checkpointing = held_out_batch(cfg), {}
    for on, flag in (("on", True), ("off", False)):
        variant = replace(mm, checkpointing=flag)
        tensors = peak_items(variant, size, budget)[1]
        by_checkpointing[on] = tensors + sum(process_items(variant, size, tensors, held_out).values())
    items |= process_items(mm, size, total, held_out) | _sampling_items(cfg, mm, plan, size)
    total = sum(items.values())
    source = (
        "largest pass of the data's first epoch" if from_data else f"{plan.micro_batch} x max_length {cfg.max_length}"
    )
    memory = MemoryPlan(
        model=cfg.model,
        device=f"{mm.device} ({dtype_name(mm.dtype)} base)" + _processes_text(mm, plan),
        batch_size=plan.micro_batch,
        gradient_accumulation_steps=plan.accumulation,
        largest_pass={"tokens": size.tokens, "targets": size.targets, "rows": size.rows, "source": source},
        items=items,
        total=total,
        budget=budget.bytes,
        budget_source=budget.source,
        fits=total <= budget.bytes,
        total_by_checkpointing=by_checkpointing,
        trainable_params=mm.shape.lora_params + mm.shape.saved_params,
        total_params=mm.shape.total_params,
    )
    if mm.shape.model_type not in MEASURED_TYPES:
        memory.notes.append(
            f"{mm.shape.model_type} blocks are estimated as Llama blocks of the same sizes; its own layers may keep "
            "more"
        )
    if from_data:
        memory.epoch_tokens = int(plan.lengths.sum()) * plan.group
    if tokens_per_second:
        _add_time(memory, tokens_per_second, throughput_source, throughput_range)
    if not memory.fits:
        memory.fixes = fixes(mm, plan, budget, cfg, from_data)
    return memory


def _add_time(memory: MemoryPlan, tokens_per_second: float, source: str, likely: tuple[float, float] | None) -> None:
    """The time per epoch at tokens_per_second, and between likely's highest and lowest tokens/s when given."""
    memory.tokens_per_second, memory.throughput_source = tokens_per_second, source
    if memory.epoch_tokens:
        memory.epoch_seconds = memory.epoch_tokens / tokens_per_second
        if likely:
            memory.epoch_seconds_range = (memory.epoch_tokens / likely[1], memory.epoch_tokens / likely[0])


def _sampling_items(cfg: TrainConfig, mm: MemoryModel, plan: StepPlan, size: PassShape) -> dict[str, int]:
    """grpo: what sampling a pass's answers (its prompts x num_generations rows, with a KV cache of prompt +
    max_new_tokens) needs beyond the largest pass's activations and working memory, which it comes before."""
    if cfg.objective != "grpo":
        return {}
    rows, new = plan.micro_batch * plan.group, cfg.max_new_tokens
    prompt = int(plan.lengths.max(initial=new + 1)) - new
    beyond = mm.generation_bytes(rows, prompt, new) - mm.pass_bytes(size.tokens, size.targets, size.rows).total
    return {f"sampling a pass's answers ({rows} rows, KV cache of {prompt + new} tokens)": max(0, beyond)}


def _processes_text(mm: MemoryModel, plan: StepPlan) -> str:
    if mm.shards > 1:
        return f", one of {mm.shards} processes with {mm.sharding.name} (weights and optimizer state sharded)"
    return f", one of {plan.processes} data-parallel processes" if plan.processes > 1 else ""


def refusal(memory: MemoryPlan) -> str:
    """Why training stops before it starts when not even batch_size 1 fits, with the fixes."""
    return (
        f"this run needs about {size_text(memory.total)} at its peak, more than {memory.budget_source} "
        f"(`loratune plan` itemises it). To make it fit, change one of: " + "; ".join(memory.fixes)
    )


# --- Making it fit ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchChoice:
    batch_size: int
    gradient_accumulation_steps: int
    peak: int  # estimated bytes at the largest pass
    largest: PassShape  # on a GPU the loop runs it for real to confirm
    reason: str


def choose_batch_size(
    mm: MemoryModel, plan: StepPlan, budget: Budget, cfg: TrainConfig, from_data: bool = True
) -> BatchChoice:
    """`batch_size: auto`: the largest micro-batch whose largest pass fits the budget; the effective batch stays
    (batch sizes that divide each process's share of a step, so the product stays exact)."""
    found, too_big = largest_fitting(mm, plan, budget)
    effective = plan.examples_per_step
    if found is None:
        need = too_big[1] if too_big else 0
        raise UserError(
            f"batch_size auto: even batch_size 1 needs about {size_text(need)}, more than {budget.source}. "
            + "Fixes: "
            + "; ".join(fixes(mm, plan.with_micro_batch(1), budget, cfg, from_data))
        )
    b, need, size = found
    accumulation = plan.with_micro_batch(b).accumulation
    reason = f"batch_size auto: {b} x gradient_accumulation_steps {accumulation} = effective batch {effective}; "
    reason += f"its largest pass needs about {size_text(need)} of {budget.source}"
    if too_big:
        reason += f" (batch_size {too_big[0]} would need {size_text(too_big[1])})"
    return BatchChoice(b, accumulation, need, size, reason)


def largest_fitting(mm: MemoryModel, plan: StepPlan, budget: Budget):
    """(batch_size, peak, largest pass) of the largest of the plan's micro-batches that fits, or None; and the
    (batch_size, peak) of the next larger one that did not fit, or None."""
    too_big = None
    for b in plan.micro_batches():
        size = largest_pass(mm, plan.with_micro_batch(b))
        need = peak_items(mm, size, budget)[1]
        if need <= budget.bytes:
            return (b, need, size), too_big
        too_big = (b, need)
    return None, too_big


def fixes(
    mm: MemoryModel, plan: StepPlan, budget: Budget, cfg: TrainConfig, from_data: bool, process: bool = True
) -> list[str]:
    """Changes that would make a run fit, each with the peak it would have; the first ones change the result least.
    `process`: the budget holds the process's own memory too (the plan); the run-time guard compares the passes'
    tensors alone with its budget, so its fixes must too."""
    size = largest_pass(mm, plan)
    items = process_items(mm, size, peak_items(mm, size, budget)[1], held_out_batch(cfg)) if process else {}
    extra = sum(items.values())
    budget = replace(budget, bytes=budget.bytes - extra)  # what the passes may use beside the process's own memory
    options: list[tuple[str, int, str]] = []  # (change, its peak without the process's own memory, remark)
    if not mm.checkpointing:
        options.append(
            ("gradient_checkpointing: true", peak(replace(mm, checkpointing=True), plan, budget), "about 30% slower")
        )
    found = largest_fitting(mm, plan, budget)[0]
    if found and found[0] < plan.micro_batch:
        b, effective = found[0], plan.examples_per_step
        options.append(
            (
                f"batch_size {b} with gradient_accumulation_steps {plan.with_micro_batch(b).accumulation}",
                found[1],
                f"the same effective batch {effective}; or batch_size: auto",
            )
        )
    if shorter := _shorter_max_length(mm, plan, budget, cfg, from_data):
        options.append(shorter)
    if mm.device == "cuda" and not mm.load_in_4bit:
        options.append(
            (
                "load_in_4bit: true",
                peak(replace(mm, load_in_4bit=True), plan, budget),
                "a 4-bit NF4 base (QLoRA); needs bitsandbytes: pip install 'loratune[qlora]'",
            )
        )
    if not any(n <= budget.bytes for _, n, _ in options):
        least = replace(mm, checkpointing=True, load_in_4bit=mm.load_in_4bit or mm.device == "cuda")
        n = peak(least, plan.with_micro_batch(1), budget)
        remark = "" if n <= budget.bytes else "a smaller model or a device with more memory is needed"
        change = "all of gradient checkpointing, batch_size 1" + (", 4-bit base" if least.load_in_4bit else "")
        options.append((change, n, remark))
    return [
        f"{change}: about {size_text(n + extra)}, {'fits' if n <= budget.bytes else 'not enough alone'}"
        + (f" ({remark})" if remark else "")
        for change, n, remark in options
    ]


def _shorter_max_length(mm, plan: StepPlan, budget: Budget, cfg: TrainConfig, from_data: bool):
    """The longest power-of-two max_length (at least 64) below the data's longest example that fits, or None."""
    length = 1 << (min(int(plan.lengths.max()), cfg.max_length) - 1).bit_length() - 1
    while length >= 64:
        shorter = replace(plan, lengths=np.minimum(plan.lengths, length), targets=np.minimum(plan.targets, length))
        n = peak(mm, shorter, budget)
        if n <= budget.bytes:
            cut = (
                f"{int((plan.lengths > length).sum())} of your examples are longer and would be cut; "
                if from_data
                else ""
            )
            return f"max_length {length}", n, cut + "`loratune data inspect` shows what your data needs"
        length //= 2
    return None
