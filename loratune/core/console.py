"""What the user sees: messages, warnings, and a live progress bar (plain log lines when not in a terminal)."""

from __future__ import annotations

import sys
import time

from rich.console import Console as RichConsole
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Console:
    """Prints only on the main process, so multi-process runs say everything once."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.out = RichConsole(highlight=False, soft_wrap=True)
        self.live = sys.stdout.isatty()

    def info(self, message: str) -> None:
        if self.enabled:
            self.out.print(message)

    def warn(self, message: str) -> None:
        if self.enabled:
            self.out.print(f"[yellow]warning:[/yellow] {message}")

    def rule(self, title: str) -> None:
        if self.enabled:
            self.out.rule(title) if self.live else self.out.print(f"--- {title} ---")

    def progress(self, total_steps: int, done: int = 0) -> StepProgress:
        return StepProgress(self, total_steps, done)


class StepProgress:
    """A bar with loss, learning rate, tokens/s, padding share and ETA; or one line per step (thinned on long
    runs)."""

    def __init__(self, console: Console, total: int, done: int):
        self.console, self.total, self.start_done = console, total, done
        self.started = time.perf_counter()
        self.every = max(1, total // 100)
        self.bar = None
        if console.enabled and console.live:
            self.bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeRemainingColumn(),
                console=console.out,
                transient=False,
            )
            self.task = self.bar.add_task("train", total=total, completed=done, stats="")
            self.bar.start()

    def update(self, step: int, epoch: float, loss: float, lr: float, tokens_per_s: float, padding: float) -> None:
        """`tokens_per_s` counts real tokens; `padding` is the share of processed positions that were padding."""
        stats = f"loss {loss:.4f} | lr {lr:.2e} | {tokens_per_s:,.0f} tok/s | padding {padding:.0%}"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, stats=stats)
        elif self.console.enabled and (step % self.every == 0 or step == self.total):
            rate = (time.perf_counter() - self.started) / max(1, step - self.start_done)
            eta = format_seconds(rate * (self.total - step))
            self.console.info(f"step {step}/{self.total} | epoch {epoch:.2f} | {stats} | eta {eta}")

    def note(self, message: str) -> None:
        if self.bar is not None:
            self.bar.console.print(message)
        else:
            self.console.info(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
