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
    """The run's progress line: what it does now (answering the held-out test k/N, training step k/N with loss,
    learning rate, tokens/s, padding share and ETA, validating, saving). In a terminal a live bar; else one line per
    phase, per held-out batch and per step (thinned on long runs)."""

    def __init__(self, console: Console, total: int, done: int):
        self.console, self.total, self.start_done = console, total, done
        self.started: float | None = None  # when training began: the ETA leaves out the held-out test before it
        self.every = max(1, total // 100)
        self.bar = None
        self.counted = None  # the live bar's task of a phase with its own count (the held-out answers)
        if console.enabled and console.live:
            self.bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeRemainingColumn(),
                console=console.out,
                transient=False,
            )
            self.task = self.bar.add_task("train", total=total, completed=done, stats="", visible=False)
            self.bar.start()

    def phase(self, key: str, text: str, done: int | None = None, total: int | None = None) -> None:
        """Say what the run does now (`key`: test, train, validate or save); a count (`done` of `total`) shows as
        its own bar."""
        first_training = key == "train" and self.started is None
        if first_training:
            self.started = time.perf_counter()
        if self.bar is None:  # lines: the counts and training's start; validation and checkpoints say their own
            if self.console.enabled and (total is not None or first_training):
                self.console.info(text + (f" {done}/{total}" if total is not None else ""))
            return
        if total is not None:
            if self.counted is None:
                self.counted = self.bar.add_task(text, total=total, stats="")
            self.bar.update(self.counted, description=text, completed=done, total=total)
            return
        if self.counted is not None:
            self.bar.remove_task(self.counted)
            self.counted = None
        self.bar.update(self.task, description="train" if key == "train" else text, visible=True)

    def update(self, step: int, epoch: float, loss: float, lr: float, tokens_per_s: float, padding: float) -> None:
        """`tokens_per_s` counts real tokens; `padding` is the share of processed positions that were padding."""
        stats = f"loss {loss:.4f} | lr {lr:.2e} | {tokens_per_s:,.0f} tok/s | padding {padding:.0%}"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, stats=stats)
        elif self.console.enabled and (step % self.every == 0 or step == self.total):
            rate = (time.perf_counter() - (self.started or time.perf_counter())) / max(1, step - self.start_done)
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
