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
from dataclasses import dataclass
from pathlib import Path

SIDES = ("fine-tuned", "base")
MAX_WORKERS = 2  # each holds a model in memory
IDLE_SECONDS = 600


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


@dataclass
class _Worker:
    proc: asyncio.subprocess.Process
    adapter: str
    idle: asyncio.TimerHandle | None = None  # ends it after IDLE_SECONDS unused


class TryWorkers:
    """The server's side: one worker per run, reused by every request for it (started again for another adapter),
    its requests one at a time. A worker ends when its request's page goes away before the model is ready or
    mid-answer, after `idle_seconds` unused, or when more than MAX_WORKERS runs would hold a model."""

    def __init__(self, log: Path, idle_seconds: float = IDLE_SECONDS):
        self.log, self.idle_seconds = log, idle_seconds
        self._workers: OrderedDict[str, _Worker] = OrderedDict()  # by run, the most recently used last
        self._turns: dict[str, asyncio.Lock] = {}

    async def ask(self, run: Path, adapter: str, request: dict):
        """The worker's messages for one request (an {"error"} when it cannot answer)."""
        key = str(run)
        async with self._turns.setdefault(key, asyncio.Lock()):
            worker = self._workers.get(key)
            if worker is not None and (worker.proc.returncode is not None or worker.adapter != adapter):
                self._end(key)
                worker = None
            hello = None
            if worker is None:
                worker, hello = await self._start(run, adapter)
                if worker is None:
                    yield hello
                    return
            if worker.idle is not None:
                worker.idle.cancel()
            self._workers.move_to_end(key)
            finished = False
            try:
                if hello:
                    yield hello
                worker.proc.stdin.write((json.dumps(request) + "\n").encode())
                await worker.proc.stdin.drain()
                while not finished:
                    message = _parse(await worker.proc.stdout.readline())
                    if message is None:
                        yield {"error": "the model process ended (see .loratune-ui/try.log)"}
                        return
                    finished = bool(message.get("end"))
                    yield message
            finally:
                if not finished:  # the page went away mid-answer: the rest of it would reach the next request
                    self._end(key)
                elif self._workers.get(key) is worker:
                    worker.idle = asyncio.get_running_loop().call_later(self.idle_seconds, self._expire, key, worker)

    async def _start(self, run: Path, adapter: str) -> tuple[_Worker | None, dict]:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "loratune.ui.tryit", str(run), adapter,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=err,
            )  # fmt: skip
        try:
            hello = _parse(await proc.stdout.readline())
        except asyncio.CancelledError:  # the page went away while the model loaded
            _kill(proc)
            raise
        hello = hello or {"error": "the model process ended while loading (see .loratune-ui/try.log)"}
        if "ready" not in hello:
            _kill(proc)
            return None, hello
        self._workers[str(run)] = worker = _Worker(proc, adapter)
        spare = [k for k in self._workers if not self._turns[k].locked()]
        for key in spare[: max(0, len(self._workers) - MAX_WORKERS)]:
            self._end(key)  # the least recently used that no request is using
        return worker, hello

    def _expire(self, key: str, worker: _Worker) -> None:
        if self._workers.get(key) is worker and not self._turns[key].locked():
            self._end(key)

    def _end(self, key: str) -> None:
        worker = self._workers.pop(key, None)
        if worker is not None:
            if worker.idle is not None:
                worker.idle.cancel()
            _kill(worker.proc)

    async def close(self) -> None:
        while self._workers:
            key, worker = next(iter(self._workers.items()))
            self._end(key)
            await worker.proc.wait()


def _parse(line: bytes) -> dict | None:
    try:
        message = json.loads(line) if line else None
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


def _kill(proc) -> None:
    """Kill at once, with no await (a cancelled request may await nothing more); asyncio reaps the process."""
    if proc.returncode is None:
        proc.kill()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
