"""Generation with the base model or base + adapter, prompts formatted exactly as in training."""

from __future__ import annotations

import torch


@torch.no_grad()
def generate_texts(
    model,
    tokenizer,
    prompts: list[list[int]],
    end_ids: set[int],
    max_new_tokens: int = 128,
    batch_size: int = 16,
    temperature: float = 0.0,
    top_p: float = 1.0,
    streamer=None,
) -> list[str]:
    """Completions of tokenized prompts, in order. Greedy unless temperature > 0. A transformers streamer
    (one prompt only) receives the tokens as they come."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    out: list[str] = [""] * len(prompts)
    pad = tokenizer.pad_token_id
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    )
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(chunk):  # left padding, so every row continues from its last prompt token
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        generated = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            eos_token_id=sorted(end_ids),
            pad_token_id=pad,
            use_cache=True,
            top_k=None,
            streamer=streamer,
            **({"temperature": None, "top_p": None} if not sampling["do_sample"] else {}),
            **sampling,
        )
        for row, i in enumerate(chunk):
            out[i] = tokenizer.decode(until_end(generated[row, width:].tolist(), end_ids), skip_special_tokens=True)
            out[i] = out[i].strip()
    model.train(was_training)
    return out


def until_end(ids: list[int], end_ids: set[int]) -> list[int]:
    """The generated tokens before the first end token: what follows it (padding of finished rows, or whatever the
    model would add after its end of turn) is no part of the answer, special token or not."""
    return next((ids[:k] for k, t in enumerate(ids) if t in end_ids), ids)
