"""Estimated against measured peak memory of one training pass, as a markdown table for docs/memory-accuracy.md.

    python -m bench.memory_accuracy                 # this machine's device (CUDA when there is one)
    python -m bench.memory_accuracy --device cpu --default-model

Measured: the peak increase of allocated memory during one forward + backward pass set up as training sets it up
(`bench/measure.py`'s `measure_pass`): torch.cuda.max_memory_allocated on CUDA, the CPU allocator's running
total on CPU.
Estimated: `MemoryModel.batch_bytes` of the same pass, from the model's config alone.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from loratune.core.config import TrainConfig
from loratune.core.device import choose_dtype
from loratune.memory.arithmetic import MemoryModel
from loratune.memory.shape import read_shape, shape_from_config
from loratune.modeling.model import load_model, resolve_model

from .measure import measure_pass

SMOLLM2 = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    tie_word_embeddings=True,
)
TINY = dict(hidden_size=64, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)

# label: (model: config sizes and block count, or a built-in name), example lengths, answer share, settings
CASES = {
    "tiny, 2 blocks, packed": ((TINY, 2), [100, 200, 50], 1.0, {}),
    "tiny, 2 blocks, padded": ((TINY, 2), [300, 250, 10, 100], 1.0, {"packing": False}),
    "tiny, 2 blocks, LoRA on q and v only": ((TINY, 2), [200, 150], 1.0, {"lora_target_modules": "q_proj,v_proj"}),
    "tiny, 3 blocks, checkpointing": ((TINY, 3), [300, 200], 1.0, {"gradient_checkpointing": True}),
    "wider, vocab 100: the backward pass sets the peak": (
        ({**TINY, "hidden_size": 128, "intermediate_size": 512, "vocab_size": 100}, 2),
        [1000],
        1.0,
        {},
    ),
    "tiny, vocab 8000, two loss chunks": (({**TINY, "vocab_size": 8000}, 2), [1500, 1500, 1200], 1.0, {}),
    "SmolLM2 sizes, 2 blocks, 30% answers, no dropout": ((SMOLLM2, 2), [600, 424], 0.3, {"lora_dropout": 0.0}),
    "SmolLM2 sizes, 2 blocks, bf16 base": ((SMOLLM2, 2), [300, 212], 1.0, {"precision": "bf16"}),
}
DEFAULT_MODEL = {  # the real default model, all 30 blocks; --default-model adds them (minutes on a CPU)
    "smollm2-135m, quickstart pass (4 x 256)": ("smollm2-135m", [256, 256, 256, 256], 0.35, {}),
    "smollm2-135m, quickstart pass, checkpointing": (
        "smollm2-135m",
        [256, 256, 256, 256],
        0.35,
        {"gradient_checkpointing": True},
    ),
}
CUDA_CASES = {  # the Guide's default pass, 8 x 1024 tokens, on a GPU
    "smollm2-135m, 8 x 1024": ("smollm2-135m", [1024] * 8, 0.5, {}),
    "smollm2-135m, 8 x 1024, checkpointing": ("smollm2-135m", [1024] * 8, 0.5, {"gradient_checkpointing": True}),
    "smollm2-135m, 8 x 1024, padded": ("smollm2-135m", [1024] * 4 + [700] * 4, 0.5, {"packing": False}),
}


def run_case(model, lengths, answer_share, settings, device):
    """One case: `model` is a built-in name or model folder, or (config sizes, blocks) of a random Llama; returns
    the pass's tokens, the base's dtype, and its measured and estimated bytes."""
    cfg = TrainConfig(**settings)
    dtype = choose_dtype(cfg.precision, device)
    if isinstance(model, str):
        path = resolve_model(model)
        shape, base = read_shape(path, cfg), load_model(path, dtype, device, load_in_4bit=cfg.load_in_4bit)
    else:
        sizes, blocks = model
        config = LlamaConfig(num_hidden_layers=blocks, **sizes)
        torch.manual_seed(0)
        shape, base = shape_from_config(config, cfg), LlamaForCausalLM(config).to(device=device, dtype=dtype)
        base.config.use_cache = False
    measured, batch = measure_pass(base, cfg, lengths, answer_share)
    estimated = MemoryModel.for_run(cfg, shape, device, dtype).batch_bytes(batch)
    return batch.input_ids.numel(), str(dtype).removeprefix("torch."), measured, estimated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--default-model", action="store_true", help="also the real default model (slow on CPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    cases = dict(CASES)
    if args.default_model or device.type == "cuda":
        cases |= DEFAULT_MODEL
    if device.type == "cuda":
        cases |= CUDA_CASES
    print(
        f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}\n"
    )
    print("| case | tokens | base | measured MiB | estimated MiB | estimated / measured |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for label, case in cases.items():
        start = time.perf_counter()
        tokens, dtype, measured, estimated = run_case(*case, device)
        print(
            f"| {label} | {tokens:,} | {dtype} | {measured / 2**20:,.1f} | {estimated / 2**20:,.1f} | "
            f"{estimated / measured:.3f} |",
            flush=True,
        )
        print(f"  ({time.perf_counter() - start:.0f}s)", flush=True, file=sys.stderr)


if __name__ == "__main__":
    main()
