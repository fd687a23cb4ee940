"""Try it: a worker process that holds one run's model and answers each request twice, with the fine-tuned model
and with the base model (the adapter turned off), streaming the tokens as JSON lines.

The UI starts it as `python -m loratune.ui.tryit RUN_DIR ADAPTER` (TryWorkers), so generating never blocks the
server. Protocol, one JSON object per line: the worker first says {"ready": ...} or {"error": ...}; each request
{"message", "history": {"fine-tuned": [...], "base": [...]}, "max_new_tokens", "temperature"} is answered by
{"side", "text"} pieces, {"side", "done", "text"} per model, then {"end": true}.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections import OrderedDict
from pathlib import Path

SIDES = ("fine-tuned", "base")
MAX_WORKERS = 2  # each holds a model in memory


_protocol = sys.stdout  # main() moves it to a copy of stdout, so that what libraries print goes to stderr


def _emit(message: dict) -> None:
    _protocol.write(json.dumps(message) + "\n")
    _protocol.flush()


def _streamer(tokenizer, side: str):
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                _emit({"side": side, "text": text})

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def _prompt_ids(run, history: list[dict], message: str, max_new_tokens: int) -> list[int]:
    """The prompt as the run's training data was formatted: a conversation, or one plain prompt for raw-text runs;
    the oldest exchanges dropped while it would not fit max_length."""
    from ..data.formats import Example
    from ..inference.run import PLAIN_FORMATS, text_prompt

    if run.data_format in PLAIN_FORMATS:
        return run.encoder.prompt_ids(text_prompt(message, run.data_format))
    turns = [t for t in history if isinstance(t, dict) and t.get("role") in ("user", "assistant")]
    while True:
        messages = [*turns, {"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        ids = run.encoder.prompt_ids(Example(messages=messages))
        if not turns or len(ids) + max_new_tokens <= run.config.max_length:
            return ids
        turns = turns[2:]


def _answer(run, request: dict) -> None:
    from ..modeling.generate import generate_texts

    max_new_tokens = min(max(int(request.get("max_new_tokens", 128)), 1), 2048)
    temperature = max(float(request.get("temperature", 0.0)), 0.0)
    history = request.get("history") or {}
    for side in SIDES:
        ids = _prompt_ids(run, history.get(side) or [], str(request["message"]), max_new_tokens)
        off = run.model.disable_adapter() if side == "base" else contextlib.nullcontext()
        with off:
            (text,) = generate_texts(
                run.model,
                run.tokenizer,
                [ids],
                run.encoder.end_ids,
                max_new_tokens,
                temperature=temperature,
                streamer=_streamer(run.tokenizer, side),
            )
        _emit({"side": side, "done": True, "text": text})
    _emit({"end": True})


def main(argv: list[str]) -> int:
    from ..core.errors import UserError
    from ..inference.run import PLAIN_FORMATS, load_run

    global _protocol
    _protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    run_dir, adapter = argv
    try:
        run = load_run(run_dir, adapter)
    except UserError as e:
        _emit({"error": str(e)})
        return 2
    _emit({"ready": True, "conversation": run.data_format not in PLAIN_FORMATS, "adapter": str(run.adapter)})
    for line in sys.stdin:
        try:
            _answer(run, json.loads(line))
        except (ValueError, KeyError, TypeError, UserError) as e:
            _emit({"error": f"bad request: {e}"})
            _emit({"end": True})
    return 0


class TryWorkers:
    """The server's side: one worker process per (run, adapter), the most recently used kept, requests one at a
    time per worker."""

    def __init__(self, log: Path):
        self.log = log
        self._workers: OrderedDict[tuple[str, str], tuple[asyncio.subprocess.Process, asyncio.Lock]] = OrderedDict()

    async def _worker(self, run: Path, adapter: str):
        key = (str(run), adapter)
        found = self._workers.get(key)
        if found and found[0].returncode is None:
            self._workers.move_to_end(key)
            return found, None
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "loratune.ui.tryit", str(run), adapter,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=err,
            )  # fmt: skip
        first = await proc.stdout.readline()
        hello = _parse(first) or {"error": "the model process ended while loading (see .loratune-ui/try.log)"}
        if "ready" not in hello:
            await _end(proc)
            return None, hello
        self._workers[key] = (proc, asyncio.Lock())
        while len(self._workers) > MAX_WORKERS:
            await _end(self._workers.popitem(last=False)[1][0])
        return self._workers[key], hello

    async def ask(self, run: Path, adapter: str, request: dict):
        """The worker's messages for one request (an {"error"} when it cannot answer)."""
        worker, hello = await self._worker(run, adapter)
        if worker is None:
            yield hello
            return
        if hello:
            yield hello
        proc, lock = worker
        async with lock:
            finished = False
            try:
                proc.stdin.write((json.dumps(request) + "\n").encode())
                await proc.stdin.drain()
                while not finished:
                    message = _parse(await proc.stdout.readline())
                    if message is None:
                        yield {"error": "the model process ended (see .loratune-ui/try.log)"}
                        return
                    finished = bool(message.get("end"))
                    yield message
            finally:
                if not finished:  # the page went away mid-answer: the rest of it would reach the next request
                    self._workers.pop((str(run), adapter), None)
                    await _end(proc)

    async def close(self) -> None:
        while self._workers:
            await _end(self._workers.popitem()[1][0])


def _parse(line: bytes) -> dict | None:
    try:
        message = json.loads(line) if line else None
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


async def _end(proc) -> None:
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
