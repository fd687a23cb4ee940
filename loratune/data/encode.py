"""Examples -> token ids and labels, with the loss mask taken from the positions of each turn.

The chat template renders the conversation; each assistant turn's character span is found by rendering the
conversation up to that turn (with and without it), never by searching for marker strings. The text is then
tokenized piece by piece, so a prompt's tokens during training are exactly the tokens generation will see.
"""

from __future__ import annotations

from pathlib import Path

from jinja2 import TemplateError

from .formats import Example, RowError

IGNORE = -100

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
}


def choose_template(tokenizer, setting: str | None) -> str:
    """The Jinja chat template to use: a .jinja file, a built-in name, the model's own, or `plain`."""
    if setting:
        if setting in BUILTIN_TEMPLATES:
            return BUILTIN_TEMPLATES[setting]
        path = Path(setting)
        if path.is_file():
            return path.read_text()
        raise RowError(
            f"chat_template = {setting!r}: not a file and not a built-in ({', '.join(BUILTIN_TEMPLATES)})"
        )
    return tokenizer.chat_template or BUILTIN_TEMPLATES["plain"]


class Encoder:
    """Turns `Example`s into (input_ids, labels); also formats generation prompts the same way."""

    def __init__(self, tokenizer, template: str, train_on_inputs: bool = False, end_ids: set[int] | None = None):
        self.tok = tokenizer
        self.template = template
        self.train_on_inputs = train_on_inputs
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise RowError("the tokenizer has no end-of-sequence token; set one before training")
        self.end_ids = {self.eos_id} | (end_ids or set())
        bos = tokenizer.bos_token_id
        # Prepend BOS only where the tokenizer itself would (Llama 2 style), and only once.
        self.bos_id = bos if bos is not None and tokenizer("a").input_ids[:1] == [bos] else None

    # --- rendering ---

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        try:
            return self.tok.apply_chat_template(
                messages, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except TemplateError as e:
            raise RowError(f"the chat template refused this conversation: {e}") from None

    def pieces(self, ex: Example) -> list[tuple[str, bool]]:
        """The example's text as consecutive (text, is_answer) pieces; text after the last answer is left out."""
        if ex.messages is None:
            return [(ex.completion, True)] if ex.train_all else [(ex.prompt, False), (ex.completion, True)]
        full = self.render(ex.messages)
        pieces, pos = [], 0
        for i, message in enumerate(ex.messages):
            if message["role"] != "assistant":
                continue
            before = self.render(ex.messages[:i], add_generation_prompt=True) if i else ""
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

    def encode(self, ex: Example) -> tuple[list[int], list[int], int]:
        """Token ids, labels (IGNORE where no loss), and where the last answer starts."""
        ids: list[int] = [] if self.bos_id is None else [self.bos_id]
        labels: list[int] = [IGNORE] * len(ids)
        answer_start = 0
        for text, is_answer in self.pieces(ex):
            piece = self.tok(text, add_special_tokens=False).input_ids if text else []
            if not ids and self.bos_id is not None and piece[:1] == [self.bos_id]:
                piece = piece[1:]
            if is_answer and (not piece or piece[-1] not in self.end_ids):
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
        ids = self.tok(text, add_special_tokens=False).input_ids
        if self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        return ids

    @staticmethod
    def reference(ex: Example) -> str:
        """The expected answer of an example (its last assistant turn or completion)."""
        if ex.messages is None:
            return ex.completion
        return [m for m in ex.messages if m["role"] == "assistant"][-1]["content"]
