"""Examples -> training sequences: token ids and labels, the loss on each answer and its end-of-turn token.

For every answer the prompt's tokens are exactly those generation is given (the template's render of the
conversation before it, with the generation prompt, tokenized as generation tokenizes it), and the targets are the
answer's tokens as the model would produce them after that prompt, through the template's end-of-turn token
(templates.py finds both, never by searching for marker strings). Answers whose prompts continue the sequence
so far share one sequence; when a template renders earlier answers differently once the conversation goes on
(Qwen3's think block, Mistral's system text), the next answer starts a sequence of its own.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import UserError
from .formats import Example, RowError
from .templates import ChatTemplate

IGNORE = -100
# Bump when a change here changes the tokens produced for the same data, tokenizer and settings.
ENCODING_VERSION = 3

BUILTIN_TEMPLATES = {
    # For base models without a template: the user's text on its own line, then the answer and the end token.
    "plain": (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'assistant' -%}{{ message['content'] + eos_token }}"
        "{%- else -%}{{ message['content'] + '\n' }}{%- endif -%}"
        "{%- endfor -%}"
    ),
    # ChatML, for tokenizers that have <|im_start|> and <|im_end|> tokens.
    "chatml": (
        "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
    ),
    # The Alpaca layout, a common choice for base models: instruction and response under headings.
    "alpaca": (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}{{ message['content'] + '\n\n' }}"
        "{%- elif message['role'] == 'user' -%}{{ '### Instruction:\n' + message['content'] + '\n\n### Response:\n' }}"
        "{%- else -%}{{ message['content'] + eos_token + '\n\n' }}{%- endif -%}"
        "{%- endfor -%}"
    ),
}
# Tokens a built-in template needs as single tokens of the vocabulary, to be offered as a fix.
BUILTIN_NEEDS = {"chatml": ("<|im_start|>", "<|im_end|>"), "plain": (), "alpaca": ()}


def choose_template(tokenizer, setting: str | None) -> str:
    """The Jinja chat template to use: a .jinja file, a built-in name, the model's own, or `plain`."""
    if setting:
        if setting in BUILTIN_TEMPLATES:
            return BUILTIN_TEMPLATES[setting]
        path, names = Path(setting), ", ".join(BUILTIN_TEMPLATES)
        if not path.is_file():
            raise RowError(f"chat_template = {setting!r}: not a file and not a built-in ({names})")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise RowError(f"chat_template = {setting!r}: cannot be read as text ({e})") from None
        if "{{" not in text and "{%" not in text:  # else every example would be this file's text, verbatim
            raise RowError(
                f"chat_template = {setting!r}: not a Jinja template (no {{{{ }}}} or {{% %}} in it); "
                f"give a Jinja template file or a built-in name ({names})"
            )
        return text
    return tokenizer.chat_template or BUILTIN_TEMPLATES["plain"]


def encoder_for(tokenizer, cfg) -> Encoder:
    """The encoder a run uses: the configured template (or the model's own), labels as configured."""
    try:
        return Encoder(tokenizer, choose_template(tokenizer, cfg.chat_template), cfg.train_on_inputs)
    except RowError as e:
        raise UserError(str(e)) from None


@dataclass
class Sequence:
    """One training sequence: token ids, labels (IGNORE where there is no loss), and where its last answer starts."""

    ids: list[int]
    labels: list[int]
    answer_start: int


@dataclass
class SplitCount:
    """Conversations whose answers could not share one sequence, and what that costs in tokens."""

    rows: int = 0  # conversations trained as more than one sequence
    sequences: int = 0  # the sequences they became
    extra_tokens: int = 0  # tokens of those sequences beyond each conversation's last: prompts encoded again
    tokens: int = 0  # tokens of every sequence

    def add(self, sequences: list[Sequence]) -> None:
        lengths = [len(s.ids) for s in sequences]
        self.tokens += sum(lengths)
        if len(lengths) > 1:
            self.rows += 1
            self.sequences += len(lengths)
            self.extra_tokens += sum(lengths[:-1])

    def line(self) -> str:
        share = self.extra_tokens / max(1, self.tokens - self.extra_tokens)
        return (
            f"{self.rows:,} conversations were trained as {self.sequences:,} sequences, one per answer the chat "
            "template renders differently once the conversation goes on (each answer after the exact prompt "
            f"generation gives it); their prompts encoded again add {self.extra_tokens:,} tokens ({share:.1%})"
        )


class Encoder:
    """Turns `Example`s into training sequences; also formats generation prompts the same way."""

    def __init__(self, tokenizer, template: str, train_on_inputs: bool = False, end_ids: set[int] | None = None):
        self.tok = tokenizer
        self.template = template
        self.train_on_inputs = train_on_inputs
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise RowError("the tokenizer has no end-of-sequence token; set one before training")
        self.chat = ChatTemplate(tokenizer, template)
        # The template's end-of-turn token ends answers, and generation stops there.
        turn_end = self.chat.turn_end
        self.end_ids = (
            {self.eos_id} | (end_ids or set()) | ({tokenizer.convert_tokens_to_ids(turn_end)} if turn_end else set())
        )
        bos = tokenizer.bos_token_id
        # Prepend BOS only where the tokenizer itself would (Llama 2 style), and only once.
        self.bos_id = bos if bos is not None and tokenizer("a").input_ids[:1] == [bos] else None

    def fingerprint(self) -> str:
        """A digest of everything that decides the tokens: vocabulary and rules, template, labels, end tokens."""
        backend = getattr(self.tok, "backend_tokenizer", None)
        rules = backend.to_str() if backend is not None else json.dumps(sorted(self.tok.get_vocab().items()))
        import transformers

        settings = [
            type(self.tok).__name__,
            str(self.tok.special_tokens_map),
            self.template,
            self.train_on_inputs,
            sorted(self.end_ids),
            self.bos_id,
            transformers.__version__,
            ENCODING_VERSION,
        ]
        return hashlib.sha256((rules + json.dumps(settings)).encode()).hexdigest()

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.chat.render(messages, add_generation_prompt)

    # --- tokens ---

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids if text else []

    def _with_bos(self, ids: list[int]) -> list[int]:
        return [self.bos_id, *ids] if self.bos_id is not None and ids[:1] != [self.bos_id] else ids

    def encode(self, ex: Example) -> list[Sequence]:
        """The example's training sequences. An answer joins the sequence so far when its generation-time prompt
        continues that sequence's text, after an answer closed by the template's own end-of-turn token (special
        tokens split the text, so what follows one is tokenized as in the whole prompt). Otherwise it starts a
        sequence of its own: its prompt tokenized whole, as generation tokenizes it."""
        out: list[Sequence] = []
        text, previous, closed = "", None, False  # the sequence's text, its last piece, how its last answer ended
        for prompt, target in self._pairs(ex):
            if out and closed and prompt.startswith(text):
                context, previous = self._piece(prompt[len(text) :], previous)
            else:
                raw = self._ids(prompt)
                out.append(Sequence([], [], 0))
                context, previous = self._with_bos(raw), (prompt, raw)
            answer, previous = self._piece(target, previous)
            if not answer or answer[-1] not in self.end_ids:
                answer = answer + [self.eos_id]  # every answer ends with an end token, so the model learns to stop
            closed = self.chat.turn_end is not None and target.endswith(self.chat.turn_end)
            seq, text = out[-1], prompt + target
            seq.ids += context
            seq.labels += context if self.train_on_inputs else [IGNORE] * len(context)
            seq.answer_start = len(seq.ids)
            seq.ids += answer
            seq.labels += answer
        return out

    def _pairs(self, ex: Example) -> list[tuple[str, str]]:
        """(prompt, target) text of each answer."""
        if ex.messages is None:
            return [("" if ex.train_all else ex.prompt, ex.completion)]
        try:
            return [(a.prompt, a.target) for a in self.chat.answers(ex.messages)]
        except RowError as e:
            raise RowError(f"{e}. {self._fix()}") from None

    def _piece(self, text: str, previous: tuple[str, list[int]] | None) -> tuple[list[int], tuple | None]:
        """A piece's tokens as they follow the previous piece (a tokenizer that marks the start of its input, such
        as SentencePiece's "▁", would mark a piece tokenized alone), and the piece as context for the next. Where
        the previous piece's last token would merge with this one's first, generation could not produce the merged
        token after the prompt it is given, so the piece is tokenized on its own."""
        if not text:
            return [], previous
        alone = self._ids(text)
        if previous and previous[0]:
            pair = self._ids(previous[0] + text)
            if pair[: len(previous[1])] == previous[1]:
                return pair[len(previous[1]) :], (text, alone)
        return alone, (text, alone)

    def _fix(self) -> str:
        """What the user can do about a conversation the template cannot render, with this tokenizer."""
        vocab = self.tok.get_vocab()
        fits = [name for name, needs in BUILTIN_NEEDS.items() if all(t in vocab for t in needs)]
        return (
            "Change the row to a conversation the template accepts, or set chat_template to a .jinja file that "
            f"renders it or to a built-in this tokenizer has the tokens for ({', '.join(fits)})"
        )

    def prompt_ids(self, ex: Example) -> list[int]:
        """Token ids of the prompt for generation: everything before the last answer (all of a conversation without
        one), formatted as in training."""
        if ex.messages is None:
            return self._with_bos(self._ids(ex.prompt))
        last = max((i for i, m in enumerate(ex.messages) if m["role"] == "assistant"), default=len(ex.messages))
        return self._with_bos(self._ids(self.render(ex.messages[:last], add_generation_prompt=True)))

    @staticmethod
    def reference(ex: Example) -> str:
        """The expected answer of an example (its last assistant turn or completion)."""
        if ex.messages is None:
            return ex.completion
        return [m for m in ex.messages if m["role"] == "assistant"][-1]["content"]
