"""Bytes of a LoRA run's memory, item by item, from the model's sizes: pure arithmetic, no tensors, no I/O.

The estimate models what this trainer keeps alive at its peak:
- frozen base weights in the base dtype (4-bit NF4 blocks for the blocks' linear layers under QLoRA);
- LoRA weights, their gradients and AdamW's two moments, all fp32 (exact counts from the model built on the meta
  device from its config.json: `shape.read_shape`);
- one forward pass: the tensors autograd saves for the backward pass, counted op by op for a Llama block as
  loratune runs it (fused fp32 LoRA layers, per-example attention), plus the larger of two working sets:
  the loss's chunks of fp32 logits (modeling.loss) or the backward pass's gradients;
- framework overhead on CUDA: the context and the caching allocator's spare blocks;
- answering the held-out test (`generation_bytes`), when its peak is above training's.
Under FSDP2 over N processes (`shards`), a device holds 1/N of the frozen weights, the LoRA weights and AdamW's
state, plus the whole weights of the units that run: the root's (embeddings, final norm, output layer) for the
whole pass and two decoder layers (the one running and the next, gathered ahead). LoRA's gradients are counted
whole: they stay unsharded while a step accumulates passes. Under DeepSpeed's ZeRO-3 the same, except that every
pass's gradients are reduced to their slices (1/N kept) and ZeRO keeps an fp32 copy of its slice of the LoRA weights
for AdamW. Not measured yet (no multi-GPU machine here).

The counts are checked against measured peaks (tests/test_memory.py, bench/memory_accuracy.py and
docs/memory-accuracy.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core.config import TrainConfig
from ..core.device import dtype_name
from ..modeling.loss import CHUNK_TOKENS, ROW_SUBSET_BELOW

GiB = 2**30
ADAPTER = 4  # bytes per LoRA value: weights, gradients and optimizer state are fp32 whatever the base
# bitsandbytes NF4 with double quantisation: 4-bit codes, an 8-bit scale per 64 values, an fp32 scale per 256 scales.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
CUDA_CONTEXT = 512 * 2**20  # CUDA runtime and kernels, outside PyTorch's allocator
CUDA_ALLOCATOR_SPARE = 0.10  # blocks the caching allocator holds beyond what tensors use
GENERATION_LOGIT_BYTES = 12  # fp32 copies of each prompt logit while generation starts (fitted, not itemised)
# Layers that read the same tensor: without dropout their adapters keep that one tensor for the backward pass.
SIBLINGS = {"q_proj": "attention", "k_proj": "attention", "v_proj": "attention", "gate_proj": "mlp", "up_proj": "mlp"}
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
# Bytes per input value a dropped-out DoRA layer keeps: the fp32 dropped-out input and torch's mask, and 2 more
# (fitted to the measured peaks of tests/test_variants.py, not itemised)
DORA_DROPPED_INPUT = 7
# Bytes per logit of the loss with a trained output layer at its peak (fitted to tests/test_variants.py's measured
# peaks of an fp32 and a bf16 base: 13 and 12)
TRAINED_HEAD_LOGIT_BYTES = 12.5
MEASURED_TYPES = ("llama",)  # block structure the per-token counts follow (tests measure it)


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
    saved_params: int = 0  # modules_to_save: the trained copies of whole layers (in the base dtype)
    head_trained: bool = False  # the output layer is one of them: the loss runs through autograd, unchunked

    @property
    def total_params(self) -> int:
        return self.block_linear_params + self.other_params + self.lora_params + self.saved_params


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
class Sharding:
    """How a sharding engine lays the trained state out on one device (each engine names its own)."""

    name: str
    sliced_gradients: bool  # reduced to each process's slice at every pass, with an fp32 copy of the weights' slice


FSDP2_SHARDS = Sharding("FSDP2", sliced_gradients=False)  # gradients whole while a step accumulates
ZERO3_SHARDS = Sharding("ZeRO-3", sliced_gradients=True)


@dataclass(frozen=True)
class MemoryModel:
    """Bytes of each item for one model and run setting. All methods are arithmetic: cheap enough per pass."""

    shape: ModelShape
    device: str  # device type: cuda, cpu, mps
    dtype: torch.dtype  # the frozen base's
    load_in_4bit: bool = False
    checkpointing: bool = False
    lora_dropout: float = 0.0
    shards: int = 1  # FSDP2 or ZeRO-3: the processes the weights and optimizer state are split over
    sharding: Sharding = field(default_factory=lambda: FSDP2_SHARDS)  # how, when shards > 1
    dora: bool = False  # PEFT's DoRA layer in place of loratune's fused one

    @classmethod
    def for_run(
        cls,
        cfg: TrainConfig,
        shape: ModelShape,
        device: torch.device | str,
        dtype: torch.dtype,
        shards: int = 1,
        sharding: Sharding | None = None,
    ) -> MemoryModel:
        return cls(
            shape,
            torch.device(device).type,
            dtype,
            cfg.load_in_4bit,
            cfg.gradient_checkpointing,
            cfg.lora_dropout,
            shards,
            sharding or FSDP2_SHARDS,
            cfg.use_dora,
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
        n = self.shards
        if n == 1:
            return {
                f"frozen weights ({kind}{dtype_name(self.dtype)})": int(frozen),
                "LoRA weights (fp32)": s.lora_params * ADAPTER,
                "LoRA gradients (fp32)": s.lora_params * ADAPTER,
                "AdamW state (2 x fp32)": 2 * s.lora_params * ADAPTER,
                **self._saved_layers(),
            }
        layer = (s.block_linear_params * per_linear + s.lora_params * ADAPTER) / max(1, s.layers)
        lora = s.lora_params * ADAPTER
        if self.sharding.sliced_gradients:  # a slice of every pass's gradients; AdamW steps an fp32 copy
            weights = {f"LoRA weights (fp32), a 1/{n} shard and ZeRO's fp32 copy of it": 2 * lora // n}
            gradients = {f"LoRA gradients (fp32), a 1/{n} shard": lora // n}
        else:
            weights = {f"LoRA weights (fp32), a 1/{n} shard": lora // n}
            gradients = {"LoRA gradients (fp32, whole while a step accumulates)": lora}
        return {
            f"frozen weights ({kind}{dtype_name(self.dtype)}), a 1/{n} shard": int(frozen / n),
            **weights,
            **gradients,
            f"AdamW state (2 x fp32), a 1/{n} shard": 2 * s.lora_params * ADAPTER // n,
            "weights gathered to run (embeddings, output layer, 2 decoder layers)": int(
                s.other_params * self.base_bytes + 2 * layer
            ),
            **self._saved_layers(),
        }

    def _saved_layers(self) -> dict[str, int]:
        """modules_to_save: PEFT's trained copy of each whole layer, its gradient and AdamW's two moments, all in the
        base dtype (the copy is the layer's own; counted whole on every process)."""
        if not self.shape.saved_params:
            return {}
        copy = self.shape.saved_params * self.base_bytes
        return {f"modules_to_save copies, their gradients and AdamW state (4 x {dtype_name(self.dtype)})": 4 * copy}

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
        copies = self._dora_weight_copies()
        if self.checkpointing:  # each block keeps only its input; one block at a time is recomputed
            saved = tokens * s.layers * s.hidden * e + model_level
            backward = tokens * block + copies + self._backward_working(tokens, targets, tokens)
        else:
            saved = tokens * (s.layers * block - first_block_saving) + model_level + s.layers * copies
            backward = self._backward_working(tokens, targets, tokens)
            if targets < ROW_SUBSET_BELOW * tokens:  # the last MLP runs on the target rows only (loss.py)
                saved -= (tokens - targets) * mlp
                # the peak is then in the last block's backward or in the next one's, once the last block's
                # saved tensors are freed
                backward = max(
                    self._backward_working(tokens, targets, targets), backward - tokens * (block - mlp) - targets * mlp
                )
        if s.head_trained:
            loss = _trained_head_loss_working(tokens, targets, s.hidden, s.vocab, e)
        else:
            loss = _loss_working(tokens, targets, s.hidden, s.vocab, e)
        return PassBytes(int(saved), int(max(loss, backward)), loss >= backward)

    def batch_bytes(self, batch) -> int:
        """Peak bytes of one forward + backward pass of a `data.batching.Batch` (activations + working memory)."""
        return self.pass_bytes(batch.input_ids.numel(), batch.n_targets, batch.input_ids.shape[0]).total

    def generation_bytes(self, rows: int, prompt: int, new: int) -> int:
        """Peak bytes of answering `rows` held-out prompts of up to `prompt` tokens with up to `new` tokens each,
        beyond the weights and the adapter's state: the prompts' logits at every position (the adapter-wrapped model
        computes them all in the first forward pass; the bytes per value, GENERATION_LOGIT_BYTES beyond the base
        dtype's, are fitted to measurement: docs/memory-accuracy.md) and the key/value cache."""
        s, e = self.shape, self.base_bytes
        logits = rows * prompt * s.vocab * (e + GENERATION_LOGIT_BYTES)
        cache = 2 * s.layers * rows * (prompt + new) * s.kv_heads * s.head_dim * e
        return int(logits + cache)

    def overhead(self, tensors: int, detected: bool) -> int:
        """Memory beyond tensors on CUDA: the context (unless measured free memory already excludes it) and the
        caching allocator's spare blocks. (A CPU process's own memory: planner.process_items.)"""
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
        for name, width, out, has_lora in s.linears:
            if not has_lora:
                continue
            group = SIBLINGS.get(name, name)
            saved = e * s.rank
            if self.dora:
                saved = self._dora_saved(width, out, group not in shared)
            elif self.lora_dropout > 0:
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

    def _dora_saved(self, width: int, out: int, first_reader: bool) -> float:
        """Bytes per token that one DoRA layer (PEFT's, all in fp32 whatever the base) keeps: lora_A's output, the
        base output and the scaled update (for the magnitude's gradient), and its input: dropped out, in fp32
        (DORA_DROPPED_INPUT), or without dropout its fp32 form, shared by the layers that read it."""
        saved = ADAPTER * (self.shape.rank + 2 * out)
        if self.lora_dropout > 0:
            return saved + width * DORA_DROPPED_INPUT
        return saved + (width * ADAPTER if first_reader else 0)

    def _dora_weight_copies(self) -> int:
        """Bytes of one block's DoRA weight copies: with dropout PEFT's DoRA recomputes the base output from the
        dropped-out fp32 input with an fp32 copy of the weight, which it keeps for the input's gradient (a 16-bit
        base's; an fp32 weight is the layer's own)."""
        if not self.dora or self.lora_dropout == 0 or self.base_bytes == ADAPTER:
            return 0
        return ADAPTER * sum(width * out for _, width, out, has_lora in self.shape.linears if has_lora)

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


def _trained_head_loss_working(tokens: int, targets: int, hidden: int, vocab: int, e: int) -> float:
    """The loss with a trained output layer (modules_to_save): the decoder's output and its target rows, then all
    targets' logits at once through autograd: the logits, their fp32 copy (in a 16-bit base), the fp32 log-softmax
    cross-entropy keeps, and in the backward pass its gradient and the logits' gradient (TRAINED_HEAD_LOGIT_BYTES
    per logit in all, fitted)."""
    return (tokens + targets) * hidden * e + targets * vocab * TRAINED_HEAD_LOGIT_BYTES


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
