"""Stopping on request: Ctrl-C or SIGTERM asks training to checkpoint and stop at the next forward-pass boundary."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from ..core.errors import UserError


class Interrupted(UserError):
    """Training stopped by a signal after saving a checkpoint; the exit code is the shell's for that signal
    (130 for SIGINT, 143 for SIGTERM), so a supervisor can tell which one stopped it."""

    def __init__(self, run: Path, signal_name: str):
        super().__init__(
            f"{signal_name}: checkpoint saved. Resume with: loratune train --resume {run}",
            exit_code=128 + signal.Signals[signal_name],
            label="stopped",
        )


class StopRequest:
    """Ctrl-C / SIGTERM ask the loop to checkpoint and stop at the next pass boundary; a second Ctrl-C stops now."""

    def __init__(self):
        self.requested = False
        self.signal_name = ""
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        print(
            f"\n{self.signal_name} received: saving a checkpoint after the current pass (Ctrl-C again to quit now)",
            flush=True,
        )

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False
