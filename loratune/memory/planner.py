"""Peak memory of a LoRA run, known before any weight is loaded: the estimate, the fit check, and batch_size: auto.

The estimate models what this trainer keeps alive at its peak, item by item:
- frozen base weights in the base dtype (4-bit NF4 blocks for the blocks' linear layers under QLoRA);
- LoRA weights, their gradients and AdamW's two moments, all fp32 (exact counts from the model built on the meta
  device from its config.json);
- one forward pass: the tensors autograd saves for the backward pass, counted op by op for a Llama block as
  loratune runs it (fused fp32 LoRA layers, per-example attention), plus the larger of two working sets:
  the loss's chunks of fp32 logits (loss.py) or the backward pass's gradients;
- framework overhead on CUDA: the context and the caching allocator's spare blocks.

The counts are checked against measured peaks (tests/test_memory.py, docs/memory-accuracy.md). On CPU,
"measured" is the CPU allocator's own running total, read from the profiler's allocation events (`measure_peak`).

The training loop goes through `RunMemory` (batch_size auto, the check before training, out-of-memory errors);
`loratune plan` through `plan_run`, which returns the same `estimate` with a throughput added.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..core.config import TrainConfig, parse_bytes
from ..core.errors import UserError
from ..modeling.loss import CHUNK_TOKENS, ROW_SUBSET_BELOW

GiB = 2**30
ADAPTER = 4  # bytes per LoRA value: weights, gradients and optimizer state are fp32 whatever the base
# bitsandbytes NF4 with double quantisation: 4-bit codes, an 8-bit scale per 64 values, an fp32 scale per 256 scales.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
CUDA_CONTEXT = 512 * 2**20  # CUDA runtime and kernels, outside PyTorch's allocator
CUDA_ALLOCATOR_SPARE = 0.10  # blocks the caching allocator holds beyond what tensors use
# Layers that read the same tensor: without dropout their adapters keep that one tensor for the backward pass.
SIBLINGS = {"q_proj": "attention", "k_proj": "attention", "v_proj": "attention", "gate_proj": "mlp", "up_proj": "mlp"}
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
MEASURED_TYPES = ("llama",)  # block structure the per-token counts follow (tests measure it)


# --- The model's sizes, from its config alone ---------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a model: sizes from its config and exact parameter counts with LoRA added."""

    model_type: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    block_linear_params: int  # frozen linear weights of the blocks (what 4-bit loading quantises)
    other_params: int  # embeddings, norms, an untied output layer
    lora_params: int
    linears: tuple[tuple[str, int, int, bool], ...]  # one block's linear layers: (name, in, out width, has LoRA)
    rank: int
    packs: bool  # supports loratune's packed attention (else training pads)

    @property
    def total_params(self) -> int:
        return self.block_linear_params + self.other_params + self.lora_params


def read_shape(model_path: str, cfg: TrainConfig) -> ModelShape:
    """The shape of the model at `model_path` (a folder or hub id) with cfg's LoRA; reads config.json only."""
    from transformers import AutoConfig

    from ..modeling.model import hub_hint

    try:
        config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as e:
        raise UserError(hub_hint(model_path, e)) from None
    # Positions past the model's last one have no position embedding (or rotary range) it was trained with.
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    if limit and cfg.max_length > limit:
        raise UserError(
            f"max_length = {cfg.max_length}: above the {limit} positions {cfg.model!r} was built for "
            f"(max_position_embeddings in its config.json); allowed: 8 to {limit}"
        )
    return shape_from_config(config, cfg)


def shape_from_config(config, cfg: TrainConfig) -> ModelShape:
    """Build the model on the meta device (no memory, no weights) and count its parameters with LoRA added."""
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    from ..modeling.model import add_lora, supports_packing

    with torch.device("meta"):
        model = add_lora(AutoModelForCausalLM.from_config(config), cfg)
    head = model.get_output_embeddings()
    frozen = {id(p): p.numel() for p in model.parameters() if not p.requires_grad}
    linears = {
        name.removesuffix(".base_layer"): m
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and m is not head and not m.weight.requires_grad
    }
    linear = {id(m.weight) for m in linears.values()}
    adapted = {name for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    text = config.get_text_config()
    heads = text.num_attention_heads
    return ModelShape(
        model_type=text.model_type,
        layers=text.num_hidden_layers,
        hidden=text.hidden_size,
        intermediate=text.intermediate_size,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        vocab=text.vocab_size,
        block_linear_params=sum(n for k, n in frozen.items() if k in linear),
        other_params=sum(n for k, n in frozen.items() if k not in linear),
        lora_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        linears=tuple(
            (name.rsplit(".", 1)[-1], m.in_features, m.out_features, name in adapted)
            for name, m in linears.items()
            if re.search(r"\.0\.", name)  # the first block's
        ),
        rank=cfg.lora_r,
        packs=supports_packing(model.get_base_model()),
    )


@dataclass(frozen=True)
class PassBytes:
    """One pass's peak: what autograd saves, plus the working memory on top of it at the peak."""

    activations: int
    working: int
    loss_is_peak: bool  # the loss's logits chunks, rather than the backward pass's gradients, set the peak

    @property
    def total(self) -> int:
        return self.activations + self.working


# --- Bytes per item ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryModel:
    """Bytes of each item for one model and run setting. All methods are arithmetic: cheap enough per pass."""

    shape: ModelShape
    device: str  # device type: cuda, cpu, mps
    dtype: torch.dtype  # the frozen base's
    load_in_4bit: bool = False
    checkpointing: bool = False
    lora_dropout: float = 0.0

    @classmethod
    def for_run(
        cls, cfg: TrainConfig, shape: ModelShape, device: torch.device | str, dtype: torch.dtype
    ) -> MemoryModel:
        return cls(
            shape, torch.device(device).type, dtype, cfg.load_in_4bit, cfg.gradient_checkpointing, cfg.lora_dropout
        )

    @property
    def base_bytes(self) -> int:
        return self.dtype.itemsize

    def static_bytes(self) -> dict[str, int]:
        """Memory held for the whole run: weights, adapter gradients, optimizer state."""
        s = self.shape
        per_linear = NF4_BYTES if self.load_in_4bit else self.base_bytes
        kind = "4-bit NF4 linear layers + " if self.load_in_4bit else ""
        frozen = s.block_linear_params * per_linear + s.other_params * self.base_bytes
        return {
            f"frozen weights ({kind}{_dtype_name(self.dtype)})": int(frozen),
            "LoRA weights (fp32)": s.lora_params * ADAPTER,
            "LoRA gradients (fp32)": s.lora_params * ADAPTER,
            "AdamW state (2 x fp32)": 2 * s.lora_params * ADAPTER,
        }

    def pass_bytes(self, tokens: int, targets: int | None = None, rows: int = 1) -> PassBytes:
        """Peak memory of one forward + backward pass of `tokens` positions (padding included) in `rows` rows.

        `targets` (positions that carry loss) defaults to all of them. Returns the activations autograd saves and
        the working memory on top of them at the pass's peak: the loss's logits chunks or the backward pass's
        gradients, whichever is larger. A packed pass is one row; a padded one `rows` rows of tokens/rows.
        """
        s, e = self.shape, self.base_bytes
        targets = tokens if targets is None else targets
        block, mlp, first_block_saving = self._block_bytes(padded=rows > 1)
        if rows > 1:  # each block's attention keeps its own [rows, 1, width, width] additive mask
            block += (tokens // rows) * e
        # Kept for the whole pass: rotary cos/sin (shared by all blocks), the final norm, the target mask, and the
        # gradient of the hidden states that the loss computes in its forward pass.
        model_level = tokens * (2 * s.head_dim * e + 4 * s.hidden + 4 + 1) + targets * s.hidden * e
        if self.checkpointing:  # each block keeps only its input; one block at a time is recomputed
            saved = tokens * s.layers * s.hidden * e + model_level
            backward = tokens * block + self._backward_working(tokens, targets, tokens)
        else:
            saved = tokens * (s.layers * block - first_block_saving) + model_level
            backward = self._backward_working(tokens, targets, tokens)
            if targets < ROW_SUBSET_BELOW * tokens:  # the last MLP runs on the target rows only (loss.py)
                saved -= (tokens - targets) * mlp
                # the peak is then in the last block's backward or in the next one's, once the last block's
                # saved tensors are freed
                backward = max(
                    self._backward_working(tokens, targets, targets), backward - tokens * (block - mlp) - targets * mlp
                )
        loss = _loss_working(tokens, targets, s.hidden, s.vocab, e)
        return PassBytes(int(saved), int(max(loss, backward)), loss >= backward)

    def batch_bytes(self, batch) -> int:
        """Peak bytes of one forward + backward pass of a `data.batching.Batch` (activations + working memory)."""
        return self.pass_bytes(batch.input_ids.numel(), batch.n_targets, batch.input_ids.shape[0]).total

    def overhead(self, tensors: int, detected: bool) -> int:
        """Memory beyond tensors. CUDA: the context (unless measured free memory already excludes it) and the
        caching allocator's spare blocks. CPU: none counted; the process's own runtime is not in the RAM we read."""
        if self.device != "cuda":
            return 0
        return int(CUDA_ALLOCATOR_SPARE * tensors) + (0 if detected else CUDA_CONTEXT)

    def _block_bytes(self, padded: bool) -> tuple[float, float, float]:
        """Bytes autograd keeps per token in one decoder block, how many of them the MLP's, and how much less the
        first block keeps.

        Llama block: two RMSNorms keep their fp32 input and 1/rms; attention keeps q, k (after rotary), v and its
        output in the base dtype (fp32 in packed rows on a CPU, which attend in fp32: loratune.attention) and an
        fp32 log-sum-exp per head (padded rows carry a mask, so k and v are first repeated to every query head, and
        the mask is kept per block: see pass_bytes); the gated MLP keeps gate, act(gate) and up. Each LoRA layer
        (loratune.lora) keeps lora_A's output (rank wide) and its input, both in the base dtype: with dropout, the
        dropped-out copy plus the record of what was dropped (`_dropped`); without, the input itself, shared by
        the layers that read it. Frozen weights need no saved inputs, except in 4-bit (bitsandbytes keeps the
        input of its product; not yet measured).
        The first block's input needs no gradient, so its first norm keeps nothing.
        """
        s, e = self.shape, self.base_bytes
        norm = 4 * s.hidden + 4
        kv_heads = s.heads if padded else s.kv_heads
        attended = 4 if self.device == "cpu" and not padded else e
        attention = (2 * s.heads + 2 * kv_heads) * s.head_dim * attended + 4 * s.heads
        mlp = 3 * s.intermediate * e
        lora, first_saving, shared = 0, norm, set()
        for name, width, _, has_lora in s.linears:
            if not has_lora:
                continue
            group = SIBLINGS.get(name, name)
            saved = e * s.rank
            if self.lora_dropout > 0:
                saved += width * (e + self._dropped)
            elif group not in shared:
                saved += width * e
                shared.add(group)
            if name in MLP_LINEARS:
                mlp += saved
            else:
                lora += saved
        if self.load_in_4bit:  # bitsandbytes' 4-bit product keeps its input, once per tensor read
            inputs = {SIBLINGS.get(name, name): width for name, width, _, _ in s.linears}
            lora += e * sum(inputs.values())
            first_saving += e * inputs.get("attention", 0)
        return 2 * norm + attention + mlp + lora, mlp, first_saving

    @property
    def _dropped(self) -> float:
        """Bytes per input value that record dropout's zeros (loratune.lora): on CPU the int64 indices of the
        dropped values, p of them on average; elsewhere a boolean keep mask; none without dropout."""
        if self.lora_dropout == 0:
            return 0
        return 8 * self.lora_dropout if self.device == "cpu" else 1

    @property
    def _dropout_grad(self) -> float:
        """Bytes per input value that a dropped-out LoRA layer's input gradient needs beyond the base layer's
        (loratune.lora._add_input_grad): on CPU the base gradient of the dropped values, kept while the adapter's
        part is added; elsewhere the adapter's part, masked, in the base dtype."""
        if self.lora_dropout == 0:
            return 0
        return self.base_bytes * (self.lora_dropout if self.device == "cpu" else 1)

    def _backward_working(self, tokens: int, targets: int, mlp_rows: int) -> float:
        """Memory the backward pass adds at its peak, in the last block (loratune.lora's fused LoRA backward).

        The largest of: down_proj's backward (the incoming gradient, the input gradient, and with dropout
        `_dropout_grad`); the gated product's backward (three [tokens, intermediate] gradients, after down_proj's
        saved input is freed); an RMSNorm's backward (six fp32 [tokens, hidden], measured). `mlp_rows` rows go
        through the MLP (the target rows in a last block run on them only). By then the final norm's input and the
        loss's hidden-state gradient are freed. A 4-bit base also dequantises its largest weight (not measured).
        """
        s, e = self.shape, self.base_bytes
        d, i = s.hidden, s.intermediate
        down_proj = d * e + i * e + self._dropout_grad * i
        product = d * e + 3 * i * e - i * (e + self._dropped)
        norm = 6 * ADAPTER * d
        freed = tokens * ADAPTER * d + targets * d * e
        dequantised = max(n * m for _, n, m, _ in s.linears) * e if self.load_in_4bit and s.linears else 0
        return max(mlp_rows * max(down_proj, product), tokens * norm) - freed + dequantised


def _loss_working(tokens: int, targets: int, hidden: int, vocab: int, e: int) -> float:
    """Memory the loss adds at its peak (loss.py): the decoder's output and its target rows in the base dtype,
    then per chunk of at most CHUNK_TOKENS targets: fp32 logits, a same-sized temporary (logsumexp, then the
    softmax), and in a 16-bit base the logits' 16-bit product and the softmax cast back. From the second chunk on,
    the previous chunk's logits and softmax are still bound while the next chunk's product is made."""
    first = min(targets, CHUNK_TOKENS)
    second = min(max(targets - CHUNK_TOKENS, 0), CHUNK_TOKENS)
    cast = 0 if e == 4 else e
    chunks = max(first * vocab * (8 + cast), 8 * first * vocab + second * vocab * (4 + cast))
    return (tokens + targets) * hidden * e + chunks + first * hidden * e


def _dtype_name(dtype: torch.dtype) -> str:
    from ..core.device import DTYPES

    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype))


# --- Measuring -----------------------------------------------------------------------------------------------


# --- The device's memory -----------------------------------------------------------------------------------------


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
        budget = Budget(given, f"{_size(given)} given")
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = Budget(free, f"{_size(free)} free of {_size(total)} on {torch.cuda.get_device_name(device)}", True)
    elif device.type == "mps":
        limit = torch.mps.recommended_max_memory()
        budget = Budget(limit, f"{_size(limit)}, the recommended maximum for this Mac's GPU")
    else:
        ram = _available_ram()
        budget = Budget(ram, f"{_size(ram)} of available RAM")
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


def _size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 4 else f"{n / 2**20:.1f} MiB"


# --- Which pass is the largest -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PassSize:
    """The largest forward pass of a run: its token positions (padding included), targets, rows, and examples."""

    tokens: int
    targets: int
    rows: int
    examples: tuple[int, ...] = ()  # indices into the training set; empty when planned from max_length alone
    source: str = ""

    @classmethod
    def of(cls, batch) -> PassSize:
        """The size of a `data.batching.Batch`."""
        return cls(batch.input_ids.numel(), batch.n_targets, batch.input_ids.shape[0], source="this batch")


def largest_pass(
    mm: MemoryModel,
    cfg: TrainConfig,
    batch_size: int,
    accumulation: int,
    lengths: np.ndarray | None = None,
    targets: np.ndarray | None = None,
    packing: bool | None = None,
) -> PassSize:
    """The pass with the highest peak: of the first epoch's passes, as training splits them, when the data's
    lengths and target counts are known; otherwise batch_size examples of max_length tokens, all targets."""
    from ..data.batching import epoch_steps, shape_bucket, split_step, wants_shape_buckets

    packing = cfg.packing if packing is None else packing
    buckets = packing and wants_shape_buckets(torch.device(mm.device), mm.dtype)
    if lengths is None or not len(lengths):
        tokens = batch_size * cfg.max_length
        return PassSize(
            tokens, tokens, 1 if packing else batch_size, source=f"{batch_size} x max_length {cfg.max_length}"
        )
    best, best_bytes, longest = None, -1, int(lengths.max())
    for step in epoch_steps(len(lengths), batch_size * accumulation, cfg.seed, 0):
        for examples in split_step(step, lengths, batch_size, packing, longest):
            if not examples:
                continue
            rows = 1 if packing else len(examples)
            tokens = int(lengths[examples].sum()) if packing else rows * int(lengths[examples].max())
            tokens = shape_bucket(tokens) if buckets else tokens
            size = PassSize(
                tokens, int(targets[examples].sum()), rows, tuple(examples), "largest pass of the data's first epoch"
            )
            total = mm.pass_bytes(size.tokens, size.targets, size.rows).total
            if total > best_bytes:
                best, best_bytes = size, total
    return best


# --- The plan ----------------------------------------------------------------------------------------------------


@dataclass
class Plan:
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
    notes: list[str] = field(default_factory=list)
    fixes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

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
            *(f"  {k:<{width}}{_size(v):>12}" for k, v in self.items.items()),
            f"  {'total':<{width}}{_size(self.total):>12}",
        ]
        if self.fits is not None:
            spare = self.budget - self.total
            verdict = f"fits ({_size(spare)} to spare)" if self.fits else f"DOES NOT FIT ({_size(-spare)} short)"
            lines.append(f"device memory: {self.budget_source} -> {verdict}")
        on, off = self.total_by_checkpointing["on"], self.total_by_checkpointing["off"]
        lines.append(f"with gradient checkpointing {_size(on)}, without {_size(off)}")
        share = 100 * self.trainable_params / max(1, self.total_params)
        lines.append(f"trainable: {self.trainable_params:,} of {self.total_params:,} parameters ({share:.2f}%)")
        if self.epoch_seconds is not None:
            lines.append(
                f"time per epoch: about {format_seconds(self.epoch_seconds)} ({self.epoch_tokens:,} tokens at "
                f"{self.tokens_per_second:,.0f} tokens/s, {self.throughput_source})"
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


def peak_items(mm: MemoryModel, size: PassSize, budget: Budget) -> tuple[dict[str, int], int]:
    """The itemised peak of a run with this model and largest pass, and its total."""
    b = mm.pass_bytes(size.tokens, size.targets, size.rows)
    items = dict(mm.static_bytes())
    items[f"activations, largest pass ({size.tokens:,} tokens{', checkpointed' if mm.checkpointing else ''})"] = (
        b.activations
    )
    working = "logits chunks and loss buffers" if b.loss_is_peak else "backward-pass gradients"
    items[f"working memory at the peak ({working})"] = b.working
    tensors = sum(items.values())
    items["framework overhead (CUDA context, allocator cache)" if mm.device == "cuda" else "framework overhead"] = (
        mm.overhead(tensors, budget.detected)
    )
    return items, sum(items.values())


def pass_fits(mm: MemoryModel, batch, budget: Budget) -> bool:
    """Whether the run's peak with this pass stays within the budget; under max_memory on CPU, where nothing
    runs out, a pass that does not fit stands for an out-of-memory error."""
    return peak_items(mm, PassSize.of(batch), budget)[1] <= budget.bytes


def estimate(
    cfg: TrainConfig,
    shape: ModelShape,
    device: torch.device | str,
    dtype: torch.dtype,
    budget: Budget,
    *,
    lengths: np.ndarray | None = None,
    targets: np.ndarray | None = None,
    packing: bool | None = None,
    tokens_per_second: float | None = None,
    throughput_source: str = "",
) -> Plan:
    """The plan for cfg on this device. `lengths`/`targets`: the training set's tokens and loss tokens per example
    (planned from batch_size x max_length without them); `batch_size: auto` is planned at the size it would pick."""
    mm = MemoryModel.for_run(cfg, shape, device, dtype)
    if cfg.batch_size == "auto":
        choice = choose_batch_size(mm, cfg, budget, lengths, targets, packing)
        batch_size, accumulation, size = choice.batch_size, choice.gradient_accumulation_steps, choice.largest
    else:
        batch_size, accumulation = cfg.batch_size, cfg.gradient_accumulation_steps
        size = largest_pass(mm, cfg, batch_size, accumulation, lengths, targets, packing)
    items, total = peak_items(mm, size, budget)
    by_checkpointing = {
        on: peak_items(replace(mm, checkpointing=flag), size, budget)[1] for on, flag in (("on", True), ("off", False))
    }
    plan = Plan(
        model=cfg.model,
        device=f"{torch.device(device).type} ({_dtype_name(dtype)} base)",
        batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        largest_pass={"tokens": size.tokens, "targets": size.targets, "rows": size.rows, "source": size.source},
        items=items,
        total=total,
        budget=budget.bytes,
        budget_source=budget.source,
        fits=total <= budget.bytes,
        total_by_checkpointing=by_checkpointing,
        trainable_params=shape.lora_params,
        total_params=shape.total_params,
    )
    if shape.model_type not in MEASURED_TYPES:
        plan.notes.append(
            f"{shape.model_type} blocks are estimated as Llama blocks of the same sizes; its own layers may keep more"
        )
    if lengths is not None and len(lengths):
        plan.epoch_tokens = int(lengths.sum())
    if tokens_per_second:
        plan.tokens_per_second, plan.throughput_source = tokens_per_second, throughput_source
        if plan.epoch_tokens:
            plan.epoch_seconds = plan.epoch_tokens / tokens_per_second
    if not plan.fits:
        plan.fixes = fixes(mm, cfg, budget, batch_size, accumulation, lengths, targets, packing)
    return plan


def require_fit(plan: Plan) -> None:
    """The check before training: stop with the fixes, rather than start a run that would run out of memory."""
    if not plan.fits:
        raise UserError(
            f"this run needs about {_size(plan.total)} at its peak, more than {plan.budget_source} "
            f"(`loratune plan` itemises it). To make it fit, change one of: " + "; ".join(plan.fixes)
        )


# --- Making it fit ---------------------------------------------------------------------------------------------

DEFAULT_BATCH_SIZE = TrainConfig.model_fields["batch_size"].default


def effective_batch(cfg: TrainConfig) -> int:
    """Examples per optimizer step that cfg asks for; `batch_size: auto` keeps the default batch size's."""
    return (DEFAULT_BATCH_SIZE if cfg.batch_size == "auto" else cfg.batch_size) * cfg.gradient_accumulation_steps


@dataclass(frozen=True)
class BatchChoice:
    batch_size: int
    gradient_accumulation_steps: int
    peak: int  # estimated bytes at the largest pass
    largest: PassSize  # on a GPU the loop runs it for real to confirm
    reason: str


def choose_batch_size(
    mm: MemoryModel,
    cfg: TrainConfig,
    budget: Budget,
    lengths: np.ndarray | None = None,
    targets: np.ndarray | None = None,
    packing: bool | None = None,
) -> BatchChoice:
    """`batch_size: auto`: the largest micro-batch whose largest pass fits the budget, with the accumulation that
    keeps the effective batch (batch sizes that divide it, so the product stays exact)."""
    effective = effective_batch(cfg)
    found, too_big = _largest_fitting(mm, cfg, budget, effective, lengths, targets, packing)
    if found is None:
        need = too_big[1] if too_big else 0
        raise UserError(
            f"batch_size auto: even batch_size 1 needs about {_size(need)}, more than {budget.source}. "
            + "Fixes: "
            + "; ".join(fixes(mm, cfg, budget, 1, effective, lengths, targets, packing))
        )
    b, peak, size = found
    reason = f"batch_size auto: {b} x gradient_accumulation_steps {effective // b} = effective batch {effective}; "
    reason += f"its largest pass needs about {_size(peak)} of {budget.source}"
    if too_big:
        reason += f" (batch_size {too_big[0]} would need {_size(too_big[1])})"
    return BatchChoice(b, effective // b, peak, size, reason)


def _largest_fitting(mm, cfg, budget, effective, lengths, targets, packing):
    """(batch_size, peak, largest pass) of the largest divisor of `effective` that fits, or None; and the
    (batch_size, peak) of the next larger one that did not fit, or None."""
    too_big = None
    for b in sorted((d for d in range(1, effective + 1) if effective % d == 0), reverse=True):
        size = largest_pass(mm, cfg, b, effective // b, lengths, targets, packing)
        peak = peak_items(mm, size, budget)[1]
        if peak <= budget.bytes:
            return (b, peak, size), too_big
        too_big = (b, peak)
    return None, too_big


def fixes(
    mm: MemoryModel,
    cfg: TrainConfig,
    budget: Budget,
    batch_size: int,
    accumulation: int,
    lengths: np.ndarray | None = None,
    targets: np.ndarray | None = None,
    packing: bool | None = None,
) -> list[str]:
    """Changes that would make a run fit, each with the peak it would have; the first ones change the result least."""

    def peak(m=mm, b=batch_size, a=accumulation, c=cfg, lens=lengths, tgts=targets) -> int:
        return peak_items(m, largest_pass(m, c, b, a, lens, tgts, packing), budget)[1]

    options: list[tuple[str, int, str]] = []  # (change, its peak, remark)
    if not mm.checkpointing:
        options.append(("gradient_checkpointing: true", peak(replace(mm, checkpointing=True)), "about 30% slower"))
    effective = batch_size * accumulation
    found = _largest_fitting(mm, cfg, budget, effective, lengths, targets, packing)[0]
    if found and found[0] < batch_size:
        b = found[0]
        options.append(
            (
                f"batch_size {b} with gradient_accumulation_steps {effective // b}",
                found[1],
                f"the same effective batch {effective}; or batch_size: auto",
            )
        )
    longest = int(lengths.max()) if lengths is not None and len(lengths) else cfg.max_length
    length = 1 << (min(longest, cfg.max_length) - 1).bit_length() - 1  # the power of two below the longest
    while length >= 64:
        shorter = cfg.model_copy(update={"max_length": length})
        if lengths is None:
            n, cut = peak(c=shorter), ""
        else:
            n = peak(c=shorter, lens=np.minimum(lengths, length), tgts=np.minimum(targets, length))
            cut = f"{int((lengths > length).sum())} of your examples are longer and would be cut; "
        if n <= budget.bytes:
            options.append((f"max_length {length}", n, cut + "`loratune data inspect` shows what your data needs"))
            break
        length //= 2
    if mm.device == "cuda" and not mm.load_in_4bit:
        options.append(
            (
                "load_in_4bit: true",
                peak(replace(mm, load_in_4bit=True)),
                "a 4-bit NF4 base (QLoRA); needs bitsandbytes: pip install 'loratune[qlora]'",
            )
        )
    if not any(n <= budget.bytes for _, n, _ in options):
        least = replace(mm, checkpointing=True, load_in_4bit=mm.load_in_4bit or mm.device == "cuda")
        n = peak(m=least, b=1, a=effective)
        remark = "" if n <= budget.bytes else "a smaller model or a device with more memory is needed"
        change = "all of gradient checkpointing, batch_size 1" + (", 4-bit base" if least.load_in_4bit else "")
        options.append((change, n, remark))
    return [
        f"{change}: about {_size(n)}, {'fits' if n <= budget.bytes else 'not enough alone'}"
        + (f" ({remark})" if remark else "")
        for change, n, remark in options
    ]


# --- During training ------------------------------------------------------------------------------------------


class RunMemory:
    """The memory side of a training run: batch_size auto, the check before training, and out-of-memory errors.

    On CUDA, `max_memory` caps PyTorch's allocator, so a pass beyond it raises a real out-of-memory error. On CPU
    nothing runs out before the machine swaps, so a pass the estimate puts over `max_memory` raises one instead:
    that is how the recovery is tested without a GPU.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        model_path: str,
        lengths: np.ndarray,
        targets: np.ndarray,
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.cfg, self.device, self.dtype = cfg, torch.device(device), dtype
        self.lengths, self.targets = lengths, targets
        self.shape = read_shape(model_path, cfg)
        self.packing = cfg.packing and self.shape.packs
        self.budget = device_budget(cfg, self.device)
        self.mm = MemoryModel.for_run(cfg, self.shape, self.device, dtype)
        self.simulated = bool(cfg.max_memory) and self.device.type != "cuda"
        if cfg.max_memory and self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, parse_bytes(cfg.max_memory) / total), self.device)

    def choose_batch_size(self) -> BatchChoice:
        return choose_batch_size(self.mm, self.cfg, self.budget, self.lengths, self.targets, self.packing)

    def check(self) -> str | None:
        """Before training: None when the run's largest pass fits; a warning when only a smaller micro-batch does
        (training will halve it when memory runs out); a UserError with the fixes when not even batch_size 1 fits."""
        cfg = self.cfg
        plan = estimate(
            cfg,
            self.shape,
            self.device,
            self.dtype,
            self.budget,
            lengths=self.lengths,
            targets=self.targets,
            packing=self.packing,
        )
        if plan.fits:
            return None
        effective = cfg.batch_size * cfg.gradient_accumulation_steps
        if _largest_fitting(self.mm, cfg, self.budget, effective, self.lengths, self.targets, self.packing)[0] is None:
            require_fit(plan)
        return (
            f"batch_size {cfg.batch_size} needs about {_size(plan.total)} at its largest pass, more than "
            f"{self.budget.source}: training will halve the micro-batch when memory runs out, keeping the effective "
            f"batch. To avoid the retries, change one of: " + "; ".join(plan.fixes)
        )

    def raise_if_over(self, batch) -> None:
        """Under max_memory on CPU: the out-of-memory error a capped GPU would raise for this pass."""
        if self.simulated and not pass_fits(self.mm, batch, self.budget):
            raise torch.OutOfMemoryError(
                f"pass of {batch.input_ids.numel()} tokens over max_memory {self.cfg.max_memory}"
            )

    def out_of_memory(self, batch_size: int) -> str:
        """The error for an out-of-memory error that halving cannot fix."""
        effective = self.cfg.batch_size * self.cfg.gradient_accumulation_steps
        found = fixes(
            self.mm,
            self.cfg,
            self.budget,
            batch_size,
            effective // batch_size,
            self.lengths,
            self.targets,
            self.packing,
        )
        return f"out of memory at batch_size {batch_size}. Change one of: " + "; ".join(found)


# --- Time per epoch ----------------------------------------------------------------------------------------------


def measured_throughput(cfg: TrainConfig) -> float | None:
    """Median tokens/s of a previous run of this config (its metrics.jsonl), the first step left out as warm-up."""
    path = Path(cfg.output_dir or "runs/run") / "metrics.jsonl"
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return None
    rates = [r["tokens_per_s"] for r in rows if r.get("event") == "train" and r.get("step", 0) > 1]
    return float(np.median(rates)) if rates else None


def benchmark_throughput(mm: MemoryModel, mean_length: float, target_share: float) -> float:
    """Tokens/s from this device's measured matrix-product rate and the FLOPs a training token costs.

    Per token: the frozen linear layers forward and their input gradients (4 x parameters; 6 x when checkpointing
    recomputes the forward), attention within its example, LoRA forward and backward, and for target tokens the
    output layer with the hidden-state gradient. Rough: the elementwise work is left out, and on a busy machine the
    benchmark is slowed down with the run.
    """
    s = mm.shape
    passes = 3 if mm.checkpointing else 2  # forward-sized units of matrix work: forward, backward (, recompute)
    attention = s.layers * mean_length * s.heads * s.head_dim
    flops = 2 * passes * s.block_linear_params + (passes + 1) * 2 * attention + 6 * s.lora_params
    flops += target_share * 4 * s.hidden * s.vocab
    return _matmul_flops(mm, 2048) / flops


def _matmul_flops(mm: MemoryModel, rows: int, seconds: float = 0.3) -> float:
    """FLOP/s of [rows, hidden] @ [hidden, intermediate] in the base dtype on the device (the blocks' main product)."""
    device = torch.device(mm.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a = torch.randn(rows, mm.shape.hidden, dtype=mm.dtype, device=device)
    b = torch.randn(mm.shape.hidden, mm.shape.intermediate, dtype=mm.dtype, device=device)
    a @ b  # warm-up
    sync()
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
        sync()
    return 2 * rows * mm.shape.hidden * mm.shape.intermediate * n / (time.perf_counter() - start)


# --- From a config to a plan (what `loratune plan` runs) -------------------------------------------------------


def plan_run(
    cfg: TrainConfig,
    *,
    gpu_memory: int | None = None,
    device: str | None = None,
    tokens_per_second: float | None = None,
) -> Plan:
    """Plan cfg's run without loading weights: the model's config, the tokenized training data (when given), the
    device's memory (`gpu_memory`: a GPU of that size, not this machine's), and the throughput for the time."""
    target, dtype, model_path, shape = _setup(cfg, gpu_memory, device)
    lengths = targets = None
    if cfg.train_data:
        from ..data.encode import encoder_for
        from ..data.prepare import prepare
        from ..modeling.model import load_tokenizer

        data = prepare(cfg, encoder_for(load_tokenizer(model_path), cfg)).train  # tokenizer only, no weights
        lengths, targets = data.lengths, data.target_counts
    budget = device_budget(cfg, target, gpu_memory)
    source = "given"
    if tokens_per_second is None:
        tokens_per_second, source = measured_throughput(cfg), f"measured in {cfg.output_dir}/metrics.jsonl"
    mm = MemoryModel.for_run(cfg, shape, target, dtype)
    if tokens_per_second is None and (gpu_memory is None or device is not None):
        mean = float(lengths.mean()) if lengths is not None and len(lengths) else cfg.max_length
        share = float(targets.sum() / lengths.sum()) if lengths is not None and len(lengths) else 1.0
        tokens_per_second = benchmark_throughput(mm, mean, share)
        source = f"rough: a matrix-product benchmark on this {target.type}"
    return estimate(
        cfg,
        shape,
        target,
        dtype,
        budget,
        lengths=lengths,
        targets=targets,
        packing=cfg.packing and shape.packs,
        tokens_per_second=tokens_per_second,
        throughput_source=source,
    )


def peak_bytes(cfg: TrainConfig) -> int:
    """Estimated peak memory of training with cfg on the device it would use, for a pass of batch_size x
    max_length tokens (the default batch size when auto). `loratune data inspect` shows it per max_length."""
    target, dtype, _, shape = _setup(cfg)
    mm = MemoryModel.for_run(cfg, shape, target, dtype)
    batch_size = DEFAULT_BATCH_SIZE if cfg.batch_size == "auto" else cfg.batch_size
    size = largest_pass(mm, cfg, batch_size, cfg.gradient_accumulation_steps, packing=cfg.packing and shape.packs)
    return peak_items(mm, size, device_budget(cfg, target))[1]


def _setup(cfg: TrainConfig, gpu_memory: int | None = None, device: str | None = None):
    """The device, base dtype, model folder and shape a plan is for (refusing 4-bit loading off CUDA)."""
    from ..core.device import DTYPES, choose_dtype, resolve_device
    from ..modeling.model import four_bit_config, resolve_model

    if gpu_memory is not None and device is None:  # a GPU that may not be here: plan as training would pick
        target = torch.device("cuda")
        dtype = torch.bfloat16 if cfg.precision == "auto" else DTYPES[cfg.precision]
    else:
        target = resolve_device(device or cfg.device)
        dtype = choose_dtype(cfg.precision, target)
    if cfg.load_in_4bit and target.type != "cuda":
        four_bit_config(target, dtype)  # raises the refusal training would give
    model_path = resolve_model(cfg.model)
    return target, dtype, model_path, read_shape(model_path, cfg)
