"""metrics.jsonl: one JSON object per event of a run (train, eval, out_of_memory, test: held-out scores), also sent
to the trackers; and the run's phases (what it does now, for the UI), which are not."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from ..core.files import atomic_write
from .tracking import Trackers


class Metrics:
    """metrics.jsonl, one JSON object per event, also sent to the trackers; a resumed run continues after the
    checkpoint's last line."""

    def __init__(self, path: Path, state, trackers: Trackers, enabled: bool):
        self.path, self.state, self.trackers, self.enabled = path, state, trackers, enabled
        self.kept: list[str] = []  # a resumed run's lines up to its checkpoint
        if enabled and path.is_file():
            self.kept = path.read_text().splitlines(keepends=True)[: state.metrics_lines]
            atomic_write(path, "".join(self.kept))

    def write(self, **record) -> None:
        """Append one event; `time` (seconds since the epoch) says when, for live views and start-up timing."""
        record = self._append(record)
        if record:
            self.trackers.log(record)

    def phase(self, phase: str, text: str, **count) -> None:
        """What the run does from now on (test, train, validate, save), in words, with a count where it has one."""
        self._append({"event": "phase", "phase": phase, "text": text, "step": self.state.step, **count})

    def earlier(self, event: str) -> dict | None:
        """The last `event` record of a resumed run's earlier segments (the base model's held-out scores)."""
        found = None
        for line in self.kept:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            found = record if isinstance(record, dict) and record.get("event") == event else found
        return found

    def _append(self, record: dict) -> dict | None:
        self.state.metrics_lines += 1
        if not self.enabled:
            return None
        record = {k: rounded(v) for k, v in record.items()} | {"time": round(time.time(), 3)}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        return record


def rounded(v):
    return float(f"{v:.7g}") if isinstance(v, float) and math.isfinite(v) else v
