"""The child processes the UI starts: `loratune train` (a new run, or --resume), `loratune merge` and
`loratune export`.

Each one is an ordinary CLI process in its own session, so it goes on when the UI stops or restarts; its record
(pid, command line, where each setting came from) and its output are kept beside the runs, in RUNS/.loratune-ui/,
so that a restarted UI still knows it, can stop it, and can tell why it ended. Stop is SIGINT, exactly Ctrl-C:
training saves a checkpoint and exits.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..core.errors import UserError
from ..core.files import atomic_write

STATE_DIR = ".loratune-ui"  # a dot-folder: never taken for a run
KINDS = ("train", "merge", "export")
LOG_TAIL_BYTES = 64 * 1024


class Conflict(UserError):
    """Refused because of the run's state (running, finished, taken): the page shows the line."""


@dataclass(frozen=True)
class Job:
    name: str  # the run it is for
    kind: str  # one of KINDS
    pid: int
    argv: list[str]  # after `loratune`
    started: float
    sources: dict[str, str] = field(default_factory=dict)  # train: where each setting came from
    returncode: int | None = None  # set when the UI that started it saw it end
    peak_rss: int | None = None  # bytes, likewise: the process's peak resident memory

    @property
    def command(self) -> str:
        return shlex.join(["loratune", *self.argv])


@dataclass(frozen=True)
class Outcome:
    """How an ended job ended, from its exit code and the last lines it printed."""

    state: str  # done, stopped or failed
    line: str


class Jobs:
    """The records of the UI's child processes under one runs folder, and the processes this UI started."""

    def __init__(self, root: Path):
        self.folder = root / STATE_DIR / "jobs"
        self._children: dict[int, subprocess.Popen] = {}
        self._lock = threading.Lock()

    def path(self, name: str, kind: str, suffix: str) -> Path:
        """A sweep's trial SWEEP/TRIAL is kept as SWEEP,TRIAL: no run's name holds a ','."""
        return self.folder / f"{name.replace('/', ',')}.{kind}.{suffix}"

    def get(self, name: str, kind: str = "train") -> Job | None:
        try:
            return Job(**json.loads(self.path(name, kind, "json").read_text()))
        except (OSError, ValueError, TypeError):  # none, or damaged: as if the UI had not started it
            return None

    def names(self, kind: str = "train") -> list[str]:
        suffix = f".{kind}.json"
        found = self.folder.glob(f"*{suffix}") if self.folder.is_dir() else []
        return [p.name[: -len(suffix)].replace(",", "/") for p in found]

    def alive(self, job: Job | None) -> bool:
        if job is None or job.returncode is not None:
            return False
        child = self._children.get(job.pid)
        if child is not None:  # _reap sets its exit code (polling here could reap it first)
            return child.returncode is None
        return _process_runs(job.pid, job.argv)  # started by an earlier UI

    @contextmanager
    def _exclusive(self):
        """Held while a job is checked and started: by this UI's threads, and (a file lock) by every other UI on
        the same runs folder, so that two of them never both find a run free and both start it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._lock, open(self.folder / "start.lock", "ab") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def start(
        self,
        name: str,
        kind: str,
        argv: list[str],
        sources: dict[str, str] | None = None,
        check: Callable[[], None] | None = None,
    ) -> Job:
        """Run `loratune ARGV` as a child in its own session, its output appended to the job's log; `check()`
        (raising to refuse) sees the run as no other start can change it until this one is recorded."""
        with self._exclusive():
            if check is not None:
                check()
            if self.alive(self.get(name, kind)):
                raise Conflict(f"{name}: a {kind} process is already running for this run")
            with open(self.path(name, kind, "log"), "ab") as log:
                log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(['loratune', *argv])}\n".encode())
                log.flush()
                child = subprocess.Popen(
                    [sys.executable, "-m", "loratune", *argv],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # Ctrl-C on the UI does not reach it; it outlives the UI
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
            self._children[child.pid] = child
            job = Job(name, kind, child.pid, argv, time.time(), sources or {})
            self._write(job)
        threading.Thread(target=self._reap, args=(child, job), daemon=True).start()
        return job

    def _reap(self, child: subprocess.Popen, job: Job) -> None:
        """Wait for the child's end; record its exit code and peak memory (what a stopped run has no summary of)."""
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = code = os.waitstatus_to_exitcode(status)
        with self._lock:
            current = self.get(job.name, job.kind)
            if current is not None and current.pid == job.pid:  # not replaced by a later start
                self._write(replace(current, returncode=code, peak_rss=usage.ru_maxrss * 1024))
            self._children.pop(child.pid, None)

    def _write(self, job: Job) -> None:
        atomic_write(self.path(job.name, job.kind, "json"), json.dumps(asdict(job), indent=1))

    def stop(self, name: str) -> None:
        """SIGINT, as Ctrl-C: training checkpoints after the current pass and exits."""
        job = self.get(name)
        if not self.alive(job):
            raise UserError(f"{name}: not running from this UI (a run started in a terminal stops with Ctrl-C there)")
        os.kill(job.pid, signal.SIGINT)

    def log_lines(self, name: str, kind: str = "train", last_segment: bool = True) -> list[str]:
        """The job's last output lines (of its latest start when `last_segment`)."""
        path = self.path(name, kind, "log")
        try:
            with open(path, "rb") as f:
                f.seek(max(0, path.stat().st_size - LOG_TAIL_BYTES))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return []
        lines = text.splitlines()
        starts = [i for i, line in enumerate(lines) if line.startswith("=== ")]
        return lines[starts[-1] + 1 :] if last_segment and starts else lines

    def outcome(self, job: Job) -> Outcome:
        """Why an ended job ended: its `stopped:` or `error:` line, a crash's last line, or its exit code."""
        lines = [line.strip() for line in self.log_lines(job.name, job.kind) if line.strip()]
        for prefix, state in (("stopped:", "stopped"), ("error:", "failed")):
            found = [line for line in lines if line.startswith(prefix)]
            if found:  # the state says "stopped" already; an error keeps the CLI's own words
                return Outcome(state, found[-1].removeprefix("stopped: "))
        if lines and lines[-1] == "stopped.":  # Ctrl-C before training's first step: nothing was saved
            return Outcome("stopped", "stopped before the first step (no checkpoint)")
        if job.returncode == 0:
            return Outcome("done", lines[-1] if lines else "finished")
        if job.returncode is not None and job.returncode < 0:
            name = signal.Signals(-job.returncode).name if -job.returncode in signal.valid_signals() else "a signal"
            return Outcome("failed", f"killed by {name} (out of memory, or ended from outside)")
        if "Traceback (most recent call last):" in lines:
            return Outcome("failed", lines[-1])
        code = "" if job.returncode is None else f" (exit code {job.returncode})"
        return Outcome("failed", (lines[-1] if lines else "ended without a message") + code)


def _process_runs(pid: int, argv: list[str]) -> bool:
    """Whether `pid` is still our `loratune ARGV` (and not a later process that reuses its number)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    words = [w.decode("utf-8", "replace") for w in cmdline if w]
    zombie = stat.rpartition(")")[2].split()[:1] == ["Z"]
    return not zombie and words[1:] == ["-m", "loratune", *argv]


def peak_rss(pid: int) -> int | None:
    """The process's peak resident memory so far (Linux), for a run that has not written its summary yet."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None
