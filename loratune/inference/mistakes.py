"""`loratune pairs`: preference pairs from a run's own mistakes.

The run answers every prompt of a data file as its held-out test does (greedy, formatted as in training, the
answer's budget the longest reference + 16 tokens), and each answer that is not an exact match of the row's
reference becomes a pair: the reference chosen, the run's answer rejected, after the same prompt. Rows of turns
give pairs of turns (rendered by the chat template when a preference run reads them), raw text rows pairs of text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import UserError
from ..data.formats import Example
from ..data.prepare import read_examples
from ..data.scores import exact_match
from ..modeling.evaluate import answer
from .run import load_run


@dataclass
class Mistakes:
    """What a run's answers to a file's prompts gave: the rows answered right, and a pair per wrong answer."""

    run_dir: Path
    data: str
    answered: int = 0
    right: int = 0
    pairs: list[dict] = field(default_factory=list)
    empty: int = 0  # wrong answers that were empty: an empty rejected answer has no tokens to train on

    @property
    def wrong(self) -> int:
        return self.answered - self.right


def mistake_pairs(
    run_dir, data: str | None = None, adapter: str = "adapter", max_new_tokens: int | None = None
) -> Mistakes:
    """The run's answers to `data`'s prompts (default: the run's own training data), scored and paired."""
    run = load_run(run_dir, adapter)
    data = data or run.config.train_data
    if not data:
        raise UserError(f"{run.run_dir}: the run names no train_data; give the rows to answer with --data FILE")
    examples = answered_examples(data, run.config)
    predictions, references = answer(run.model, run.tokenizer, run.encoder, examples, max_new_tokens)
    out = Mistakes(run.run_dir, data, answered=len(examples))
    for example, prediction, reference in zip(examples, predictions, references):
        if exact_match(prediction, reference):
            out.right += 1
        elif not prediction.strip():
            out.empty += 1
        else:
            out.pairs.append(pair_row(example, reference, prediction))
    return out


def answered_examples(data: str, cfg) -> list[Example]:
    """The file's rows with their reference answers, read as the run read its training data."""
    try:
        examples = read_examples(data, "train", cfg)
    except UserError as e:
        raise UserError(f"{e}; pairs needs each row's prompt and reference answer, in a shape training reads") from None
    if any(ex.train_all for ex in examples):
        raise UserError(f"{data}: plain text rows have no prompt to answer; give rows with a prompt and its answer")
    return examples


def pair_row(example: Example, chosen: str, rejected: str) -> dict:
    """A `{"prompt", "chosen", "rejected"}` row as `data.pairs` reads it: the prompt's turns and two one-turn
    assistant answers, or raw text."""
    if example.messages is None:
        return {"prompt": example.prompt, "chosen": chosen, "rejected": rejected}
    last = max(i for i, m in enumerate(example.messages) if m["role"] == "assistant")
    return {
        "prompt": example.messages[:last],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }
