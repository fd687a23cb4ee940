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
# Role names seen in chat data (OpenAI, ShareGPT, Gemini style) -> the three a chat template knows.
ROLE_NAMES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "model": "assistant",
    "bot": "assistant",
    "chatgpt": "assistant",
}

# Fields that hold an answer's reasoning apart from its content (the names transformers passes to templates).
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")


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
    check_mapping(columns, mapping)  # a mapping to a column that is not there explains the failure best
    expected = "; ".join(f"{s}: {', '.join(c)}" for s, c in SHAPES.items())
    raise RowError(
        f"cannot tell the data format from columns {sorted(present)}. Expected one of ({expected}); "
        "map yours with `columns: {input: your_column, ...}` or set data_format"
    )


def check_columns(columns: list[str], fmt: str, mapping: dict[str, str]) -> None:
    """A data_format named by the user: its columns must be there (checked once, on the first row)."""
    missing = [c for c in (mapping.get(c, c) for c in SHAPES[fmt]) if c not in columns]
    if missing:
        check_mapping(columns, mapping, fmt)
        raise RowError(
            f"data_format {fmt} needs column {missing[0]!r}, which is missing (columns: {sorted(columns)}); "
            "map yours with `columns: {...}`"
        )


def check_mapping(columns: list[str], mapping: dict[str, str], fmt: str | None = None) -> None:
    """Every `columns` entry must name a column of the data (checked on the first row), else the mapping is wrong
    or silently unused. A row may lack its system column, and an alpaca row its input."""
    optional = {"system", "input"} if fmt == "alpaca" else {"system"}
    for role, col in mapping.items():
        if col not in columns and role not in optional:
            raise RowError(
                f"columns {role}={col}: the data has no column {col!r} (its columns: "
                f"{', '.join(sorted(columns)) or 'none'})"
            )


def to_example(row: dict[str, Any], fmt: str, mapping: dict[str, str]) -> Example:
    """One row -> Example, or RowError saying which field is missing or of the wrong type.

    Answers may be empty here (a prompt to generate from has none); `require_answers` checks training rows."""

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
    head = [_msg("system", system)] if system else []
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
        return Example(messages=_chat(row.get(col), col))
    raise RowError(f"unknown data_format {fmt!r}")


def require_answers(ex: Example, fmt: str, mapping: dict[str, str]) -> None:
    """A training row needs every answer non-empty: an empty one would teach the model to stop at once."""
    if fmt in ("messages", "sharegpt"):
        col = mapping.get(SHAPES[fmt][0], SHAPES[fmt][0])
        for i, m in enumerate(ex.messages):  # one message per turn, so i is the turn's index in the row
            if m["role"] == "assistant" and not m["content"].strip():
                raise RowError(f"{col}[{i}] is an empty assistant turn: nothing to learn from")
        return
    answer = ex.messages[-1]["content"] if ex.messages else ex.completion
    if not answer.strip():
        role = {"prompt_completion": "completion", "text": "text"}.get(fmt, "output")
        raise RowError(f"field {mapping.get(role, role)!r} is empty: nothing to learn from")


def _msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def prompt_messages(turns: Any, col: str) -> list[dict[str, str]]:
    """A prompt given as turns (GRPO's `prompt`): canonical messages ending before the answer to generate."""
    messages = _chat(turns, col, answered=False)
    if messages[-1]["role"] == "assistant":
        raise RowError(f"field {col!r} must end with a user or system turn: the answer is what the model writes")
    return messages


def _chat(turns: Any, col: str, answered: bool = True) -> list[dict[str, str]]:
    """A list of turns, each {role, content} or ShareGPT's {from, value}, as canonical messages (with an assistant
    turn to learn from, when `answered`)."""
    if not isinstance(turns, list) or not turns:
        raise RowError(f"field {col!r} must be a non-empty list of turns")
    messages = []
    for i, turn in enumerate(turns):
        keys = ("role", "content") if isinstance(turn, dict) and "role" in turn else ("from", "value")
        if not isinstance(turn, dict) or not all(k in turn for k in keys):
            raise RowError(f"{col}[{i}] must be an object with 'role' and 'content' (or 'from' and 'value')")
        name, content = turn[keys[0]], turn[keys[1]]
        role = ROLE_NAMES.get(str(name).lower())
        if role is None:
            raise RowError(f"{col}[{i}].{keys[0]} = {name!r}: expected one of {', '.join(ROLE_NAMES)}")
        if not isinstance(content, str):
            raise RowError(f"{col}[{i}].{keys[1]} must be text, got {type(content).__name__}")
        messages.append(_msg(role, content) | _reasoning(turn, f"{col}[{i}]"))
    if answered and not any(
        m["role"] == "assistant" for m in messages[1:]
    ):  # an opening assistant turn answers nothing
        raise RowError(f"field {col!r} has no assistant turn after a user or system turn: nothing to learn from")
    return messages


def _reasoning(turn: dict, where: str) -> dict[str, str]:
    """An answer's reasoning, given apart from its content, for templates that render it (Qwen3's think block)."""
    for key in REASONING_KEYS:
        if turn.get(key) is not None:
            if not isinstance(turn[key], str):
                raise RowError(f"{where}.{key} must be text, got {type(turn[key]).__name__}")
            return {"reasoning_content": turn[key]}
    return {}


def prompt_text(ex: Example) -> str:
    """The user's part of an example, for showing next to an answer."""
    return ex.prompt if ex.messages is None else [m for m in ex.messages if m["role"] == "user"][-1]["content"]
