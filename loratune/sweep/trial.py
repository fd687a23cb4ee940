"""One trial: `loratune train CONFIG --output-dir TRIAL_FOLDER --field=value ...` as a child process, followed
through its metrics.jsonl. Each validation loss is reported to Optuna; when the pruner says so, the child gets
SIGINT (as Ctrl-C: it saves a checkpoint and exits) and the trial is pruned. Its result is summary.json's best
validation loss."""

from __future__ import annotations

import ctypes
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState

from ..core.errors import first_line
from .space import as_flags
from .study import GRACE_SECONDS, HEARTBEAT_SECONDS, heartbeat

POLL_SECONDS = 0.5
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Outcome:
    state: TrialState
    value: float | None
    steps: int
    full_steps: int | None
    seconds: float
    message: str = ""


class EvalLines:
    """The "eval" events of a metrics.jsonl that a child is writing: complete lines only, each read once."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def new(self) -> list[tuple[int, float]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                text = f.read()
        except OSError:  # not written yet
            return []
        complete = text[: text.rfind(b"\n") + 1]
        self.offset += len(complete)
        out = []
        for line in complete.decode("utf-8", "replace").splitlines():
            record = json.loads(line)
            loss = record.get("val_loss")
            if record.get("event") == "eval" and isinstance(loss, float) and math.isfinite(loss):
                out.append((record["step"], loss))
        return out


def run_trial(study, storage, trial: optuna.Trial, config_file: str, values: dict, folder: Path, log: Path) -> Outcome:
    """Train the trial in a child process, prune it when Optuna says so, and tell the study how it ended."""
    argv = [sys.executable, "-m", "loratune", "train", config_file, f"--output-dir={folder}", *as_flags(values)]
    trial.set_user_attr("values", values)  # now: a trial whose worker is killed still shows what it tried
    trial.set_user_attr("folder", str(folder))
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(log, "ab") as out:
        child = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the sweep, which passes one SIGINT on
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        pruned = _follow(child, trial, storage, EvalLines(folder / "metrics.jsonl"))
    except KeyboardInterrupt:
        _stop(child)
        _record(trial, folder, time.monotonic() - started)
        study.tell(trial, state=TrialState.FAIL)
        raise
    outcome = _outcome(child.returncode, pruned, folder, log, time.monotonic() - started)
    try:
        _record(trial, folder, outcome.seconds)
        study.tell(trial, outcome.value if outcome.state == TrialState.COMPLETE else None, state=outcome.state)
    except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
        message = f"marked failed by another worker meanwhile (no heartbeat for {GRACE_SECONDS}s); not counted"
        return Outcome(TrialState.FAIL, None, outcome.steps, outcome.full_steps, outcome.seconds, message)
    return outcome


def _follow(child: subprocess.Popen, trial: optuna.Trial, storage, evals: EvalLines) -> bool:
    """Report each validation loss until the child ends; SIGINT it once the pruner says so. Returns whether it
    was pruned."""
    pruned, beat = False, time.monotonic()
    while True:
        ended = child.poll() is not None  # before reading: the last lines are in once it has ended
        for step, loss in evals.new():
            trial.report(loss, step)
            if not pruned and trial.should_prune():
                child.send_signal(signal.SIGINT)
                pruned = True
        if ended:
            return pruned
        if time.monotonic() - beat >= HEARTBEAT_SECONDS:
            heartbeat(storage, trial)
            beat = time.monotonic()
        time.sleep(POLL_SECONDS)


def _stop(child: subprocess.Popen) -> None:
    """Ctrl-C on the sweep: the trial checkpoints and exits; a second Ctrl-C makes it quit at once."""
    child.send_signal(signal.SIGINT)
    try:
        child.wait()
    except KeyboardInterrupt:
        child.send_signal(signal.SIGINT)
        child.wait()


def _die_with_parent() -> None:
    """In the child: a worker killed outright cannot stop its trial, so the kernel sends the trial SIGTERM then
    (it checkpoints and exits) instead of leaving it training alone."""
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _outcome(code: int, pruned: bool, folder: Path, log: Path, seconds: float) -> Outcome:
    steps, full = trained_steps(folder), full_steps(folder)
    if pruned:
        return Outcome(TrialState.PRUNED, None, steps, full, seconds, "pruned")
    best = (_read_json(folder / "summary.json") or {}).get("best_val_loss") if code == 0 else None
    if isinstance(best, float) and math.isfinite(best):
        return Outcome(TrialState.COMPLETE, best, steps, full, seconds)
    why = _last_error(log) if code != 0 else "no validation loss in summary.json"
    return Outcome(TrialState.FAIL, None, steps, full, seconds, f"{why} (exit code {code}; log: {log})")


def _record(trial: optuna.Trial, folder: Path, seconds: float) -> None:
    """What the results and best.yaml need, kept in the study (another machine's worker may write them)."""
    trial.set_user_attr("seconds", round(seconds, 1))
    trial.set_user_attr("steps", trained_steps(folder))
    trial.set_user_attr("full_steps", full_steps(folder))
    config = folder / "config.yaml"
    if config.is_file():
        trial.set_user_attr("config", yaml.safe_load(config.read_text()))


def trained_steps(folder: Path) -> int:
    """The last optimizer step in the run's metrics.jsonl (0 before the first)."""
    try:
        lines = (folder / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    steps = [0]
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # a last line cut short by a kill
            continue
        if record.get("event") == "train":
            steps.append(record["step"])
    return steps[-1]


def full_steps(folder: Path) -> int | None:
    """The steps the run would have made without early stopping or pruning (resolved.json), if it got that far."""
    return (_read_json(folder / "resolved.json") or {}).get("total_steps")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _last_error(log: Path) -> str:
    """The child's `error:` line (the CLI's one-line reason), else its last line."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no output"
    errors = [line for line in lines if line.startswith(("error:", "stopped:"))]
    return first_line(Exception((errors or lines or ["no output"])[-1]))
