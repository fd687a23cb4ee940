"""Example shapes: detect them from the columns and turn each row into chat messages or raw text.

Every instruction or chat shape becomes a list of messages, rendered later by one chat template, so training
and generation format prompts the same way. `prompt_completion` and `text` stay raw text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Columns that identify each shape, checked in this order (Alpaca before input/output: it has both).
SHAPES = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "input_output": ("input", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "model": "assistant", "bot": "assistant", "chatgpt": "assistant"}
ROLES = ("system", "user", "assistant")


class RowError(ValueError):
    """A row that cannot be used; the message says what is wrong with it (the caller adds where)."""


@dataclass
class Example:
    """A row in canonical form: chat `messages`, or raw `prompt` + `completion` text (prompt may be empty)."""

    messages: list[dict[str, str]] | None = None
    prompt: str = ""
    completion: str = ""
    train_all: bool = False  # plain text: every token is a target


def detect_format(columns: list[str], mapping: dict[str, str]) -> str:
    """The shape whose columns are present (after mapping ours -> yours)."""
    present = set(columns)
    for shape, needed in SHAPES.items():
        if all(mapping.get(c, c) in present for c in needed):
            return shape
    expected = "; ".join(f"{s}: {', '.join(c)}" for s, c in SHAPES.items())
    raise RowError(
        f"cannot tell the data format from columns {sorted(present)}. Expected one of ({expected}); "
        "map yours with `columns: {input: your_column, ...}` or set data_format"
    )


def required_columns(fmt: str, mapping: dict[str, str]) -> list[str]:
    return [mapping.get(c, c) for c in SHAPES[fmt]]


def to_example(row: dict[str, Any], fmt: str, mapping: dict[str, str]) -> Example:
    """One row -> Example, or RowError saying which field is missing or of the wrong type."""

    def get(role: str, required: bool = True) -> str:
        col = mapping.get(role, role)
        value = row.get(col)
        if value is None:
            if required:
                raise RowError(f"missing field {col!r}")
            return ""
        if not isinstance(value, str):
            raise RowError(f"field {col!r} must be text, got {type(value).__name__}")
        return value

    system = get("system", required=False)
    head = [{"role": "system", "content": system}] if system else []
    if fmt == "input_output":
        return Example(messages=[*head, _msg("user", get("input")), _msg("assistant", get("output"))])
    if fmt == "alpaca":
        instruction, extra = get("instruction"), get("input", required=False)
        user = f"{instruction}\n\n{extra}" if extra else instruction
        return Example(messages=[*head, _msg("user", user), _msg("assistant", get("output"))])
    if fmt == "prompt_completion":
        return Example(prompt=get("prompt"), completion=get("completion"))
    if fmt == "text":
        return Example(completion=get("text"), train_all=True)
    if fmt in ("messages", "sharegpt"):
        col = mapping.get(SHAPES[fmt][0], SHAPES[fmt][0])
        return Example(messages=_chat(row.get(col), col, sharegpt=fmt == "sharegpt"))
    raise RowError(f"unknown data_format {fmt!r}")


def _msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def _chat(turns: Any, col: str, sharegpt: bool) -> list[dict[str, str]]:
    if not isinstance(turns, list) or not turns:
        raise RowError(f"field {col!r} must be a non-empty list of turns")
    role_key, text_key = ("from", "value") if sharegpt else ("role", "content")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise RowError(f"{col}[{i}] must be an object with {role_key!r} and {text_key!r}")
        role = SHAREGPT_ROLES.get(str(turn[role_key]).lower()) if sharegpt else turn[role_key]
        if role not in ROLES:
            raise RowError(f"{col}[{i}].{role_key} = {turn[role_key]!r}: expected one of {', '.join(ROLES)}")
        if not isinstance(turn[text_key], str):
            raise RowError(f"{col}[{i}].{text_key} must be text, got {type(turn[text_key]).__name__}")
        messages.append(_msg(role, turn[text_key]))
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError(f"field {col!r} has no assistant turn to learn from")
    return messages
