"""Generation with the base model or base + adapter, prompts formatted exactly as in training."""

from __future__ import annotations

import numpy as np
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
    options = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {}
    ids = generate_ids(model, prompts, end_ids, tokenizer.pad_token_id, max_new_tokens, batch_size, options, streamer)
    return [tokenizer.decode(until_end(x, end_ids), skip_special_tokens=True).strip() for x in ids]


@torch.no_grad()
def generate_ids(
    model,
    prompts: list[list[int]],
    end_ids: set[int],
    pad_id: int,
    max_new_tokens: int,
    batch_size: int = 16,
    options: dict | None = None,
    streamer=None,
    processor_for=None,
) -> list[list[int]]:
    """The tokens generated after each prompt, in order, through the first end token (kept); batched with a KV
    cache, prompts left-padded. Greedy unless `options` (transformers' generate arguments) sample, or
    `processor_for(indices)` gives a logits processor for the batch of these prompts (`SeededSampling`)."""
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    out: list[list[int]] = [[] for _ in prompts]
    options = options or {"do_sample": False, "temperature": None, "top_p": None}
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(chunk):  # left padding, so every row continues from its last prompt token
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        processors = [processor_for(chunk)] if processor_for is not None else None
        generated = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            eos_token_id=sorted(end_ids),
            pad_token_id=pad_id,
            use_cache=True,
            top_k=None,
            streamer=streamer,
            logits_processor=LogitsProcessorList(processors or []),
            **options,
        )
        for row, i in enumerate(chunk):
            tokens = generated[row, width:].tolist()
            out[i] = next((tokens[: k + 1] for k, t in enumerate(tokens) if t in end_ids), tokens)
    model.train(was_training)
    return out


class SeededSampling:
    """Sampling at `temperature` within the `top_p` mass, each row drawing from its own generator (Gumbel-max: the
    argmax of the scaled logits plus Gumbel noise is a sample of their softmax, so greedy decoding samples). A row's
    draws depend on its seed alone, never on the other rows of its batch: any split of the prompts into batches
    samples the same tokens (up to the rounding of the batched logits)."""

    def __init__(self, generators: list[torch.Generator], temperature: float, top_p: float):
        self.generators, self.temperature, self.top_p = generators, temperature, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float() / self.temperature
        if self.top_p < 1:
            scores = _nucleus(scores, self.top_p)
        uniform = torch.stack([torch.rand(scores.shape[1], generator=g) for g in self.generators])
        gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-20)))
        return scores + gumbel.to(scores.device)


def _nucleus(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Scores outside the smallest set of tokens whose probability reaches top_p set to -inf (as transformers'
    TopPLogitsWarper: the most likely token always stays)."""
    ordered, indices = scores.sort(dim=-1)
    cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= 1 - top_p
    drop[:, -1] = False
    return scores.masked_fill(drop.scatter(1, indices, drop), float("-inf"))


def row_generator(*key: int) -> torch.Generator:
    """A generator seeded by a tuple of integers (run seed, step, prompt, sample): the same key draws the same
    numbers in any process and after a resume."""
    seed = int(np.random.SeedSequence(list(key)).generate_state(2, np.uint64)[0] >> np.uint64(1))
    return torch.Generator().manual_seed(seed)


def until_end(ids: list[int], end_ids: set[int]) -> list[int]:
    """The generated tokens before the first end token: what follows it (padding of finished rows, or whatever the
    model would add after its end of turn) is no part of the answer, special token or not."""
    return next((ids[:k] for k, t in enumerate(ids) if t in end_ids), ids)
