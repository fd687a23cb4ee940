"""The benchmark's workload: instruction/answer pairs with skewed lengths, and the tokens every trainer trains on.

Lengths are drawn in tokens of the model's own tokenizer from log-normal distributions, like real instruction
data: most prompts and answers are short, a few are long. The words come from the text loratune ships (the
quickstart task), so no data is downloaded. loratune reads the rows as a JSONL file; the reference trainers get
the same examples tokenized here the way loratune documents it (chat template, loss on the answer only, the
answer ending with the end-of-turn token), and the harness checks that both sides count the same tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loratune.modeling.tiny import corpus_lines

IGNORE = -100
# Log-normal token lengths: (median, sigma, min, max). Medians 80 and 40 with sigma 0.9 give means of about
# 120 and 60 tokens and a long tail, clipped to the 10-600 / 5-300 ranges of the issue.
PROMPT_LENGTHS = (80, 0.9, 10, 600)
ANSWER_LENGTHS = (40, 0.9, 5, 300)


@dataclass
class Workload:
    rows: list[dict]  # {"input": prompt, "output": answer}, the JSONL loratune reads
    input_ids: list[list[int]]
    labels: list[list[int]]  # IGNORE on prompt tokens

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(x) for x in self.input_ids])

    @property
    def targets(self) -> np.ndarray:
        """Tokens that carry loss per example (the first token is never predicted)."""
        return np.array([sum(y != IGNORE for y in labels[1:]) for labels in self.labels])

    def write_jsonl(self, path: Path) -> Path:
        return write_rows(self.rows, path)


@dataclass
class PairWorkload:
    """Preference pairs: a prompt and two answers of independent lengths, as loratune reads them (one user turn,
    two one-turn assistant answers) and as token ids in TRL's DPO columns (each answer through its end token)."""

    rows: list[dict]  # {"prompt": [user turn], "chosen": [assistant turn], "rejected": [assistant turn]}
    prompt_ids: list[list[int]]
    chosen_ids: list[list[int]]
    rejected_ids: list[list[int]]

    @property
    def lengths(self) -> np.ndarray:
        """Real tokens of a pair: its two sequences, prompt + chosen and prompt + rejected (every trainer runs both)."""
        return np.array([2 * len(p) + len(c) + len(r) for p, c, r in self._columns()])

    @property
    def targets(self) -> np.ndarray:
        """Answer tokens of a pair, whose log-probabilities the loss compares."""
        return np.array([len(c) + len(r) for _, c, r in self._columns()])

    @property
    def longest_sequence(self) -> int:
        """The most tokens of one sequence (a prompt and its longer answer): what `max_length` limits."""
        return max(len(p) + max(len(c), len(r)) for p, c, r in self._columns())

    def _columns(self):
        return zip(self.prompt_ids, self.chosen_ids, self.rejected_ids)

    def write_jsonl(self, path: Path) -> Path:
        return write_rows(self.rows, path)


def write_rows(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def make_workload(tokenizer, n_examples: int, seed: int) -> Workload:
    rng = np.random.default_rng(seed)
    words = " ".join(corpus_lines()).split()
    rows = [
        {
            "input": _text(tokenizer, words, _length(rng, PROMPT_LENGTHS), rng),
            "output": _text(tokenizer, words, _length(rng, ANSWER_LENGTHS), rng),
        }
        for _ in range(n_examples)
    ]
    encoded = [encode(tokenizer, row["input"], row["output"]) for row in rows]
    return Workload(rows, [ids for ids, _ in encoded], [labels for _, labels in encoded])


def make_pairs(tokenizer, n_pairs: int, seed: int) -> PairWorkload:
    """`n_pairs` prompts of the workload's prompt lengths, each with two answers of its answer lengths."""
    rng = np.random.default_rng(seed)
    words = " ".join(corpus_lines()).split()
    out = PairWorkload([], [], [], [])
    for _ in range(n_pairs):
        prompt = _text(tokenizer, words, _length(rng, PROMPT_LENGTHS), rng)
        answers = [_text(tokenizer, words, _length(rng, ANSWER_LENGTHS), rng) for _ in range(2)]
        (chosen, labels), (rejected, _) = (encode(tokenizer, prompt, answer) for answer in answers)
        cut = labels.count(IGNORE)  # the prompt's tokens, the same before either answer
        out.rows.append(
            {"prompt": [_turn("user", prompt)], "chosen": [_turn("assistant", answers[0])],
             "rejected": [_turn("assistant", answers[1])]}
        )  # fmt: skip
        out.prompt_ids.append(chosen[:cut])
        out.chosen_ids.append(chosen[cut:])
        out.rejected_ids.append(rejected[cut:])
    return out


def _turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def _length(rng, spec) -> int:
    median, sigma, low, high = spec
    return int(np.clip(round(rng.lognormal(np.log(median), sigma)), low, high))


def _text(tokenizer, words: list[str], n_tokens: int, rng) -> str:
    """Random words cut after exactly `n_tokens` tokens of this tokenizer."""
    text = " ".join(rng.choice(words, size=2 * n_tokens + 8))
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return text[: offsets[n_tokens - 1][1]].strip()


def encode(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """One example as the model sees it: the chat-formatted prompt (no loss), then the answer and its end token.

    The trailing newline some templates put after the end-of-turn token is left out: it is not part of the answer.
    """
    user, assistant = _turn("user", prompt), _turn("assistant", answer)
    head = tokenizer.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template([user, assistant], tokenize=False)
    if not full.startswith(head):
        raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
    prompt_ids = tokenizer(head, add_special_tokens=False).input_ids
    answer_ids = tokenizer(full[len(head) :].rstrip(), add_special_tokens=False).input_ids
    if answer_ids[-1:] != [tokenizer.eos_token_id]:
        answer_ids.append(tokenizer.eos_token_id)
    bos = tokenizer.bos_token_id
    if bos is not None and tokenizer("a").input_ids[:1] == [bos]:  # only where the tokenizer itself adds one
        prompt_ids = [bos] + prompt_ids
    return prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids
