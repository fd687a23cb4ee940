"""A helper process that draws a run's plots: `loratune train` starts it before it imports torch.

Importing the plotting library and drawing take a few tenths of a second of interpreter time. In the training
process that time is all spent on the run's path: before the end of a short run, or during its first step, where a
thread importing it holds the interpreter lock each kernel of the step waits for. The helper imports the library
on a core that the training process's single-threaded start-up leaves idle, and draws while the training process
saves its last adapter. Where there is no helper (the library's `train`, other processes than the main one) or it
failed, the training process draws the plots itself (`report.write_report`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

WAIT_SECONDS = 120  # for drawing that has been asked for; a helper that takes longer is replaced by the run's own


class PlotProcess:
    """Started early; `draw` sends it a run's records; `drawn` waits for the plots; `close` ends it either way."""

    def __init__(self) -> None:
        self.child = subprocess.Popen(
            [sys.executable, "-m", __name__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # a failure shows as no answer: the run then draws and reports it itself
            text=True,
            start_new_session=True,  # Ctrl-C is the run's to handle (it saves a checkpoint), not the helper's
        )
        self.asked = False

    def draw(self, run: Path, train: list[dict], evals: list[dict], best: dict | None) -> None:
        """Ask for the plots of these records (report.draw_plots'); returns once the helper has the request."""
        request = {"run": str(run), "train": train, "evals": evals, "best": best}
        try:
            self.child.stdin.write(json.dumps(request) + "\n")
            self.child.stdin.close()
            self.asked = True
        except OSError:  # the helper has ended: the run draws the plots itself
            pass

    def drawn(self) -> bool:
        """Whether the plots asked for are drawn, once the helper has ended (within WAIT_SECONDS)."""
        if not self.asked:
            return False
        try:
            self.child.wait(WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            self.close()
            return False
        return self.child.returncode == 0 and self.child.stdout.read().strip() == "drawn"

    def close(self) -> None:
        """End the helper: let it finish plots it was asked for (so that no half-written file stays), else stop it."""
        if self.asked and self.child.poll() is None:
            try:
                self.child.wait(WAIT_SECONDS)
            except subprocess.TimeoutExpired:
                pass
        if self.child.poll() is None:
            self.child.kill()
            self.child.wait()
        for pipe in (self.child.stdin, self.child.stdout):
            pipe.close()


def main() -> None:
    from .report import draw_plots, pyplot

    pyplot()  # now, while the training process imports torch
    line = sys.stdin.readline()
    if not line:  # the run ended without asking (it failed or was stopped)
        return
    request = json.loads(line)
    draw_plots(Path(request["run"]), request["train"], request["evals"], request["best"])
    print("drawn", flush=True)


if __name__ == "__main__":
    main()
