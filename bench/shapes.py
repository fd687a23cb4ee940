"""Model shapes for the GPU benchmark: the configs of Qwen2.5-0.5B and Llama-3.2-1B with random weights.

Speed and memory depend on a model's sizes, not on its trained weights, so the benchmark writes random-weight
model folders with these configs (no hub) and the tests' own tokenizer (`loratune.modeling.tiny`). The real
vocabulary size is kept: the output layer's cost is real, the tokenizer simply uses its first 1,024 ids. On a
CPU (`--device cpu`) the same model types run at tiny sizes, to check the harness.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Sizes as in the models' published config.json files.
SHAPES = {
    "qwen2.5-0.5b": dict(
        model_type="qwen2",
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        use_sliding_window=False,
        tie_word_embeddings=True,
    ),
    "llama-3.2-1b": dict(
        model_type="llama",
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        tie_word_embeddings=True,
    ),
}
# The same model types at sizes a CPU trains in seconds (the vocabulary is the tokenizer's).
TINY = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
TOKENIZER_SIZE = 1024


def shape_config(name: str, tiny: bool):
    """The transformers config of shape `name`, at its real sizes or (tiny) scaled down."""
    from transformers import AutoConfig

    sizes = dict(SHAPES[name])
    if tiny:
        sizes |= TINY | {"head_dim": TINY["hidden_size"] // TINY["num_attention_heads"], "vocab_size": TOKENIZER_SIZE}
    return AutoConfig.for_model(**sizes)


def describe(name: str, tiny: bool) -> str:
    c = shape_config(name, tiny)
    size = "tiny sizes of " if tiny else ""
    return (
        f"{size}{name} (random weights; {c.model_type}, hidden {c.hidden_size}, {c.num_hidden_layers} layers, "
        f"{c.num_attention_heads} heads / {c.num_key_value_heads} KV, MLP {c.intermediate_size}, vocab {c.vocab_size})"
    )


def write_model(path: Path, name: str, tiny: bool, device: str, dtype: torch.dtype, seed: int = 0) -> str:
    """Write a random-weight model folder of shape `name` with the tests' tokenizer; built on `device` (fast for a
    1B model on a GPU) and saved in `dtype`."""
    from transformers import AutoModelForCausalLM

    from loratune.modeling.tiny import make_tokenizer

    tokenizer = make_tokenizer(TOKENIZER_SIZE)
    config = shape_config(name, tiny)
    config.bos_token_id = None
    config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return str(path)
