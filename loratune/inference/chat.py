"""`loratune chat`: a conversation with the fine-tuned model, formatted exactly as its training data was.

Interactive in a terminal; from a script (stdin not a terminal) each input line is one message and each reply is
written as it is generated, followed by a newline. `/reset` starts a new conversation, `/exit` (or end of input)
quits.
"""

from __future__ import annotations

import contextlib
import sys

from ..data.formats import Example
from ..modeling.generate import generate_texts
from .run import PLAIN_FORMATS, load_run, text_prompt


def _streamer(tokenizer, out, end_ids: set[int]):
    import torch
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def put(self, value) -> None:
            if self.skip_prompt and self.next_tokens_are_prompt:
                return super().put(value)
            # the end-of-turn token ends the reply: never shown, even where the tokenizer does not call it special
            kept = [t for t in value.reshape(-1).tolist() if t not in end_ids]
            if kept:
                super().put(torch.tensor(kept))

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            out.write(text)
            out.flush()

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def chat(
    run_dir,
    adapter: str = "adapter",
    system: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stdin=None,
    stdout=None,
) -> None:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    run = load_run(run_dir, adapter)
    interactive = stdin.isatty() and stdout.isatty()
    # Raw-text runs never saw a conversation: one prompt at a time, as `text_prompt` formats it.
    multi_turn = run.data_format not in PLAIN_FORMATS
    head = [{"role": "system", "content": system}] if system else []
    history: list[dict] = []
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
        print(
            f"{run.config.model} + {run.adapter} ({'conversation' if multi_turn else 'one prompt at a time'}). "
            "/reset starts over, /exit quits.",
            file=stdout,
        )
    for text in _typed(stdin, interactive):
        if text == "/reset":
            history.clear()
            print("(new conversation)", file=sys.stderr)
            continue
        user = {"role": "user", "content": text}
        prompt = _prompt(run, head, history, user, multi_turn)
        while history and len(prompt) + max_new_tokens > run.config.max_length:
            history = history[2:]  # the oldest exchange goes first, to stay within the length trained on
            print("(oldest turn dropped to fit max_length)", file=sys.stderr)
            prompt = _prompt(run, head, history, user, multi_turn)
        reply = _answer(run, prompt, stdout, interactive, max_new_tokens, temperature, top_p)
        if multi_turn and reply is not None:
            history += [user, {"role": "assistant", "content": reply}]


def _typed(stdin, interactive: bool):
    """The user's lines, stripped, until the input ends or /exit; blank lines are skipped."""
    while True:
        try:
            line = input("you> ") if interactive else stdin.readline()
        except EOFError:
            line = ""
        text = line.strip()
        if not line or text == "/exit":  # end of input
            return
        if text:
            yield text


def _answer(run, prompt: list[int], stdout, interactive: bool, max_new_tokens, temperature, top_p) -> str | None:
    """The model's reply, streamed to `stdout`; None when the user stopped it (Ctrl-C)."""
    if interactive:
        stdout.write("model> ")
    try:
        (reply,) = generate_texts(
            run.model,
            run.tokenizer,
            [prompt],
            run.encoder.end_ids,
            max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            streamer=_streamer(run.tokenizer, stdout, run.encoder.end_ids),
        )
    except KeyboardInterrupt:  # stop this answer, keep the conversation as it was
        stdout.write("\n(stopped)\n")
        return None
    stdout.write("\n")
    stdout.flush()
    return reply


def _prompt(run, head: list[dict], history: list[dict], user: dict, multi_turn: bool) -> list[int]:
    if multi_turn:
        example = Example(messages=[*head, *history, user, {"role": "assistant", "content": ""}])
    else:
        example = text_prompt(user["content"], run.data_format)
    return run.encoder.prompt_ids(example)
