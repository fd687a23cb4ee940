"""A tiny random Llama with a tokenizer trained on text shipped with loratune.

For tests and benchmarks: it builds in a second, offline, and behaves like any transformers model folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..data.encode import BUILTIN_TEMPLATES

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


def corpus_lines() -> list[str]:
    """Text the project ships: the quickstart task's examples."""
    lines = []
    for path in sorted((Path(__file__).parents[1] / "quickstart" / "data").glob("*.jsonl")):
        for row in map(json.loads, path.read_text().splitlines()):
            lines += [row["input"], row["output"]]
    return lines


def make_tokenizer(vocab_size: int = 512, chat: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>" if chat else "<|endoftext|>",
        pad_token="<pad>",
    )
    if chat:
        fast.chat_template = BUILTIN_TEMPLATES["chatml"]
    return fast


def make_tiny_model(
    path: str | Path,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int | None = None,
    vocab_size: int = 512,
    chat: bool = True,
    seed: int = 0,
) -> Path:
    """Write a random-weight Llama and its tokenizer to `path` (a normal transformers model folder)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = make_tokenizer(vocab_size, chat)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
