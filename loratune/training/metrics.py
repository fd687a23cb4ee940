"""metrics.jsonl: one JSON object per event of a run (train, eval, out_of_memory), also sent to the trackers."""

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
        if enabled and path.is_file():
            lines = path.read_text().splitlines(keepends=True)[: state.metrics_lines]
            atomic_write(path, "".join(lines))

    def write(self, **record) -> None:
        """Append one event; `time` (seconds since the epoch) says when, for live views and start-up timing."""
        self.state.metrics_lines += 1
        if self.enabled:
            record = {k: rounded(v) for k, v in record.items()} | {"time": round(time.time(), 3)}
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.trackers.log(record)


def rounded(v):
    return float(f"{v:.7g}") if isinstance(v, float) and math.isfinite(v) else v
