"""Examples -> token ids and labels, with the loss mask taken from the positions of each turn.

The chat template renders the conversation; each assistant turn's character span is found by rendering the
conversation up to that turn (with and without it), never by searching for marker strings. The text is then
tokenized piece by piece, each piece in the context of the one before it, so a prompt's tokens during training
are the tokens generation will see, and an answer's tokens are the ones the model would produce after it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from jinja2 import TemplateError

from ..core.errors import UserError
from .formats import Example, RowError

IGNORE = -100
# Bump when a change here changes the tokens produced for the same data, tokenizer and settings.
ENCODING_VERSION = 2

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


class Encoder:
    """Turns `Example`s into (input_ids, labels); also formats generation prompts the same way."""

    def __init__(self, tokenizer, template: str, train_on_inputs: bool = False, end_ids: set[int] | None = None):
        self.tok = tokenizer
        self.template = template
        self.train_on_inputs = train_on_inputs
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise RowError("the tokenizer has no end-of-sequence token; set one before training")
        self.end_ids = {self.eos_id} | (end_ids or set()) | self._turn_end()
        bos = tokenizer.bos_token_id
        # Prepend BOS only where the tokenizer itself would (Llama 2 style), and only once.
        self.bos_id = bos if bos is not None and tokenizer("a").input_ids[:1] == [bos] else None

    def _turn_end(self) -> set[int]:
        """The special token that closes an assistant turn in this template (ChatML's <|im_end|>, Gemma's
        <end_of_turn>), found at the end of a rendered probe turn: it ends answers, and generation stops there."""
        try:
            answer = [
                p
                for p, is_answer in self.pieces(
                    Example(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
                )
                if is_answer
            ][-1]
        except RowError:
            return set()
        last = self._ids(answer)[-1:]
        special = {i for i, t in self.tok.added_tokens_decoder.items() if t.special}
        return set(last) & special

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

    # --- rendering ---

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        try:
            return self.tok.apply_chat_template(
                messages, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        # A template's own checks (raise_exception), or its assumptions about the turns, failing.
        except (TemplateError, ValueError, IndexError, KeyError, TypeError) as e:
            raise RowError(f"the chat template refused this conversation: {e}") from None

    def pieces(self, ex: Example) -> list[tuple[str, bool]]:
        """The example's text as consecutive (text, is_answer) pieces; text after the last answer is left out."""
        if ex.messages is None:
            return [(ex.completion, True)] if ex.train_all else [(ex.prompt, False), (ex.completion, True)]
        full = self.render(ex.messages)
        pieces, pos = [], 0
        for i, message in enumerate(ex.messages):
            if message["role"] != "assistant" or i == 0:  # an opening assistant turn answers nothing: context
                continue
            before = self.render(ex.messages[:i], add_generation_prompt=True)
            upto = self.render(ex.messages[: i + 1])
            if not (full.startswith(upto) and upto.startswith(before) and len(before) >= pos):
                raise RowError(
                    "the chat template does not render turns as a growing prefix, so answer positions cannot be "
                    "found; set chat_template to one that does (e.g. chatml)"
                )
            end = len(upto.rstrip())  # whitespace after the end-of-turn token is context, not a target
            pieces += [(full[pos : len(before)], False), (full[len(before) : end], True)]
            pos = end
        return pieces

    # --- tokens ---

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids if text else []

    def encode(self, ex: Example) -> tuple[list[int], list[int], int]:
        """Token ids, labels (IGNORE where no loss), and where the last answer starts."""
        ids: list[int] = []
        labels: list[int] = []
        answer_start = 0
        previous: tuple[str, list[int]] | None = None
        for text, is_answer in self.pieces(ex):
            if not text:
                continue
            alone = self._ids(text)
            piece = alone
            if previous is not None:
                # The piece's tokens as they come after the previous piece: a tokenizer that marks the start of
                # its input (SentencePiece's leading "▁") would otherwise put a start mark mid-sequence.
                pair = self._ids(previous[0] + text)
                if pair[: len(previous[1])] == previous[1]:
                    piece = pair[len(previous[1]) :]
            previous = (text, alone)
            if not ids and self.bos_id is not None and piece[:1] != [self.bos_id]:
                piece = [self.bos_id] + piece
            if is_answer and piece[-1] not in self.end_ids:
                piece = piece + [self.eos_id]  # every answer ends with an end token, so the model learns to stop
            if is_answer:
                answer_start = len(ids)
            ids += piece
            labels += piece if is_answer or self.train_on_inputs else [IGNORE] * len(piece)
        return ids, labels, answer_start

    def prompt_ids(self, ex: Example) -> list[int]:
        """Token ids of the prompt for generation: everything before the last answer, formatted as in training."""
        if ex.messages is None:
            text = ex.prompt
        else:
            last = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
            text = self.render(ex.messages[:last], add_generation_prompt=True)
        ids = self._ids(text)
        if self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        return ids

    @staticmethod
    def reference(ex: Example) -> str:
        """The expected answer of an example (its last assistant turn or completion)."""
        if ex.messages is None:
            return ex.completion
        return [m for m in ex.messages if m["role"] == "assistant"][-1]["content"]
