"""What the run folders under the runs folder say: each run's state and numbers, its metrics and its details.

Everything here reads files that a training process may be writing at the same moment, or that a crash left
half-written, or that someone deletes: a file that cannot be read counts as absent, a metrics line cut in the
middle waits for its end, and a damaged line is skipped and counted.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..core.config import TrainConfig
from ..core.errors import UserError
from ..data.encode import Encoder
from ..data.formats import prompt_text
from ..data.prepare import DataReport, Fit, read_examples
from ..training.charts import charts_json
from ..training.checkpoint import checkpoint_position, list_checkpoints
from .jobs import Jobs, peak_rss

FRESH_SECONDS = 60  # a run started outside the UI that wrote metrics this recently counts as running
RESERVED = {"uploads", "merged"}  # folders of the runs folder that the UI writes, never runs
SAMPLE_CHARS = 2000


def inside(root: Path, path: Path) -> bool:
    """Whether `path`, its links followed, stays in the runs folder `root` (resolved): a run folder or file that
    links elsewhere is never read or served."""
    return os.path.realpath(path).startswith(os.path.join(root, ""))


def loads(text: str | bytes):
    """JSON, with the NaN and Infinity that Python writes (a skipped non-finite step's loss) read as null: the page
    can parse null and draws it as a gap, and no comparison takes it for a number."""
    return json.loads(text, parse_constant=lambda _: None)


def read_json(path: Path, root: Path):
    """The file's JSON, or None when it is missing, damaged, half-written or links outside the runs folder."""
    if not inside(root, path):
        return None
    try:
        return loads(path.read_text())
    except (OSError, ValueError):
        return None


class MetricsLog:
    """metrics.jsonl read incrementally: complete lines only; restarted from the top when the file was replaced or
    shortened (a resumed run rewrites it to its checkpoint's lines)."""

    def __init__(self, path: Path, root: Path):
        self.path, self.root = path, root
        self._reset()

    def _reset(self) -> None:
        self.records: list[dict] = []
        self.bad_lines = 0
        self._offset, self._inode, self._tail = 0, None, b""

    def update(self) -> tuple[list[dict], bool]:
        """(records new since the last call, whether the earlier ones were dropped: then all records are new)."""
        try:
            st = os.stat(self.path) if inside(self.root, self.path) else None
        except OSError:
            st = None
        reset = st is None or st.st_ino != self._inode or st.st_size < self._offset
        if reset:
            had = bool(self.records or self._offset)
            self._reset()
            if st is None:
                return [], had
            self._inode = st.st_ino
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except OSError:
            return [], reset
        self._offset += len(chunk)
        *lines, self._tail = (self._tail + chunk).split(b"\n")  # the last piece has no end yet: it waits
        new = []
        for line in lines:
            try:
                record = loads(line) if line.strip() else None
            except ValueError:
                record = None
                self.bad_lines += 1
            if isinstance(record, dict) and "event" in record:
                new.append(record)
        self.records += new
        return (self.records if reset else new), reset

    @property
    def train(self) -> list[dict]:
        return [r for r in self.records if r["event"] == "train" and isinstance(r.get("step"), int)]

    @property
    def evals(self) -> list[dict]:
        return [r for r in self.records if r["event"] == "eval" and isinstance(r.get("val_loss"), (int, float))]


@dataclass(frozen=True)
class State:
    state: str  # running, done, stopped or failed
    why: str
    outside: bool  # started outside this UI (in a terminal): it cannot be stopped from here


class Runs:
    """The runs under one runs folder (a folder with config.yaml or metrics.jsonl, or a run this UI started)."""

    def __init__(self, root: Path, jobs: Jobs):
        self.root, self.jobs = root, jobs
        self._logs: dict[str, MetricsLog] = {}

    def folder(self, name: str) -> Path:
        return self.root / name

    def is_run_folder(self, name: str) -> bool:
        """A real folder, as is the sweep folder holding it: one that links elsewhere is not followed."""
        folder = self.folder(name)
        parents = [self.folder(name.split("/")[0])] if "/" in name else []
        return folder.is_dir() and not any(p.is_symlink() for p in [folder, *parents])

    def names(self) -> list[str]:
        """Every run, whatever its folder's name (spaces, any script) but a ',' (Compare's separator) or a leading
        '.' (the UI's own state, and '..'); only these names are ever joined to the runs folder. A folder that is
        not a run but holds runs (a sweep's runs/sweep-NAME/trial-007/) lists them as SWEEP/TRIAL."""
        jobs = [n for n in self.jobs.names() if all(map(_listed, n.split("/")))]
        found = {n for n in jobs if self.is_run_folder(n) or self._folderless(n)}
        for name in _children(self.root):
            if _is_run(self.root / name):
                found.add(name)
            elif self.is_run_folder(name):
                trials = _children(self.root / name)
                found.update(f"{name}/{trial}" for trial in trials if _is_run(self.root / name / trial))
        return sorted(found)

    def read_json(self, path: Path):
        return read_json(path, self.root)

    def checkpoints(self, name: str) -> list[Path]:
        run = self.folder(name)
        return [p for p in list_checkpoints(run) if inside(self.root, p)] if self.is_run_folder(name) else []

    def adapters(self, name: str) -> list[str]:
        """The run's adapters written so far: the best (adapter/) and the last (last/)."""
        run = self.folder(name)
        return [
            a
            for a in ("adapter", "last")
            if inside(self.root, run / a / "adapter_config.json") and (run / a / "adapter_config.json").is_file()
        ]

    def _folderless(self, name: str) -> bool:
        """A run this UI started that has no folder: one still loading, or one that failed before it made its
        folder (its error is worth showing); a run whose folder was deleted is gone."""
        job = self.jobs.get(name)
        return self.jobs.alive(job) or (job is not None and self.jobs.outcome(job).state == "failed")

    def metrics(self, name: str) -> MetricsLog:
        log = self._logs.get(name)
        if log is None:
            log = self._logs[name] = MetricsLog(self.folder(name) / "metrics.jsonl", self.root)
        log.update()
        return log

    def state(self, name: str) -> State:
        run, job = self.folder(name), self.jobs.get(name)
        if self.jobs.alive(job):
            resuming = "--resume" in job.argv
            waiting = "" if (run / "metrics.jsonl").is_file() else "loading the model and data"
            return State("running", "resumed" if resuming and not waiting else waiting, False)
        summary = self.read_json(run / "summary.json")
        if isinstance(summary, dict):
            return State("done", str(summary.get("stop_reason", "finished")), job is None)
        if job is not None:
            outcome = self.jobs.outcome(job)
            return State("failed" if outcome.state == "done" else outcome.state, outcome.line, False)
        return self._state_outside(name)

    def _state_outside(self, name: str) -> State:
        """A run started in a terminal: running while it writes, else stopped at its last checkpoint."""
        try:
            age = time.time() - (self.folder(name) / "metrics.jsonl").stat().st_mtime
        except OSError:
            age = None
        if age is not None and age < FRESH_SECONDS:
            return State("running", "started outside the UI", True)
        checkpoints = self.checkpoints(name)
        if checkpoints:
            step = checkpoint_position(checkpoints[-1])[0]
            # a sweep's trial stops so when its pruner gives up on it (the study, not the folder, says which)
            how = "stopped by its sweep (pruned, or the sweep was stopped)" if "/" in name else ""
            why = f"{how or 'ended without a summary'}; resumable from its checkpoint at step {step}"
            return State("stopped", why, True)
        return State("failed", "ended before its first checkpoint (started in a terminal, which says why)", True)

    def row(self, name: str) -> dict:
        """The run's line in the runs list."""
        run, state = self.folder(name), self.state(name)
        config = _read_yaml(run / "config.yaml", self.root)
        resolved = self.read_json(run / "resolved.json") or {}
        summary = self.read_json(run / "summary.json") or {}
        log = self.metrics(name)
        train, evals = log.train, log.evals
        job = self.jobs.get(name)
        peak, peak_of = summary.get("peak_memory_bytes"), summary.get("peak_memory_of")
        if peak is None and job is not None:  # no summary yet: the process's own peak, while it runs or after
            peak = peak_rss(job.pid) if state.state == "running" else job.peak_rss
            peak_of = "peak resident memory of the training process" if peak else None
        best = summary.get("best_val_loss") or min((r["val_loss"] for r in evals), default=None)
        rates = [r["tokens_per_s"] for r in train[-10:] if isinstance(r.get("tokens_per_s"), (int, float))]
        return {
            "name": name,
            "group": name.split("/")[0] if "/" in name else None,  # the sweep (the folder) the run is a trial of
            "state": state.state,
            "why": state.why,
            "outside": state.outside,
            "exists": self.is_run_folder(name),
            "model": config.get("model") if config else None,
            "data": config.get("train_data") if config else None,
            "step": train[-1]["step"] if train else 0,
            "total_steps": resolved.get("total_steps"),
            "best_val_loss": best,
            "tokens_per_s": summary.get("tokens_per_s") or (statistics.median(rates) if rates else None),
            "peak_memory": peak,
            "peak_memory_of": peak_of,
            "started": _started(run, job, train),
            "phase": _phase(log.records, job, state, resolved.get("total_steps")),
            "checkpoints": len(self.checkpoints(name)),
            "bad_metrics_lines": log.bad_lines,
        }

    def details(self, name: str) -> dict:
        """Everything the run page shows besides the charts' data (and which charts its objective's metrics make)."""
        run = self.folder(name)
        raw = _read_yaml(run / "config.yaml", self.root)
        job = self.jobs.get(name)
        summary = self.read_json(run / "summary.json")
        exists = self.is_run_folder(name)  # else a run that failed before making it: its row says why
        return {
            "row": self.row(name),
            "config": _config_rows(raw, job.sources if job else {}),
            "config_error": "config.yaml is missing or damaged" if exists and not raw else None,
            "resolved": self.read_json(run / "resolved.json"),
            "data": _data_lines(self.read_json(run / "data.json")),
            "summary": summary,
            "samples": _samples(raw, summary),
            "charts": charts_json(self.metrics(name).records),
            "test_data": bool(raw.get("test_data")),  # set: its answers come when training ends
            "checkpoints": [
                {"name": p.name, "step": step, "passes": passes, "time": _mtime(p)}
                for p in self.checkpoints(name)
                for step, passes in [checkpoint_position(p)]
            ],
            "adapters": self.adapters(name),
            "command": job.command if job else None,
            "log": self.jobs.log_lines(name)[-40:] if job else [],
            "merge": _job_state(self.jobs, self.jobs.get(name, "merge"), "merging base and adapter"),
            "export": _job_state(self.jobs, self.jobs.get(name, "export"), "writing the GGUF file"),
        }


def _read_yaml(path: Path, root: Path) -> dict:
    if not inside(root, path):
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _started(run: Path, job, train: list[dict]) -> float | None:
    """When the run began: its first start from this UI, else its first step's time less that step's duration."""
    if job is not None and "--resume" not in job.argv:
        return job.started
    if train and isinstance(train[0].get("time"), (int, float)):
        return train[0]["time"] - float(train[0].get("seconds") or 0)
    return _mtime(run / "config.yaml")


def _phase(records: list[dict], job, state: State, total_steps) -> dict | None:
    """What a running run does now: its latest phase line; while training, its latest step and the time left at the
    pace of its latest steps. A run this UI started that has written no phase line since it started is loading."""
    if state.state != "running":
        return None
    since = job.started if job is not None else 0.0  # a resumed run's folder still holds its earlier phase lines
    records = [r for r in records if isinstance(r.get("time"), (int, float)) and r["time"] >= since]
    phases = [r for r in records if r["event"] == "phase"]
    if not phases:
        return {"phase": "load", "text": "loading the model and data"} if job is not None else None
    last = phases[-1]
    if last.get("phase") != "train":
        return {k: last.get(k) for k in ("phase", "text", "done", "total")}
    steps = [r for r in records if r["event"] == "train" and isinstance(r.get("step"), int)][-20:]
    out = {"phase": "train", "text": "training step", "done": steps[-1]["step"] if steps else last.get("step"),
           "total": total_steps}  # fmt: skip
    # the median: a validation, a checkpoint or a stop and resume between two steps is no part of the pace
    gaps = [b["time"] - a["time"] for a, b in zip(steps, steps[1:]) if b["step"] == a["step"] + 1]
    if gaps and isinstance(total_steps, int):
        out["eta_seconds"] = round(statistics.median(gaps) * (total_steps - out["done"]), 1)
    return out


def _config_rows(raw: dict, sources: dict[str, str]) -> list[dict]:
    """Each setting with its value and where it came from (recorded when this UI started the run)."""
    rows = []
    for name, info in TrainConfig.model_fields.items():
        if name not in raw:
            continue
        default = info.default_factory() if info.default_factory else info.default
        source = sources.get(name) or ("default" if raw[name] == default else "set outside the UI (not recorded)")
        rows.append({"name": name, "value": raw[name], "source": source, "help": info.description})
    return rows


def _data_lines(raw) -> list[dict]:
    """What the data step found (data.json), as training printed it."""
    try:
        report = DataReport(**{**raw, "train_fit": Fit(**raw["train_fit"]), "val_fit": Fit(**raw["val_fit"])})
    except (TypeError, KeyError):  # none, damaged, or from another version of loratune
        return []
    return [{"warning": warn, "text": text} for warn, text in report.lines()]


def _samples(raw: dict, summary) -> list[dict]:
    """The held-out test answers before and after training, with their prompts and references when readable."""
    before = ((summary or {}).get("test_before") or {}).get("samples") or []
    after = ((summary or {}).get("test_after") or {}).get("samples") or []
    examples = []
    if after and raw.get("test_data") and Path(raw["test_data"]).exists():
        try:
            cfg = TrainConfig(**raw)
            examples = read_examples(cfg.test_data, "test", cfg)[: len(after)]
        except (UserError, ValueError, TypeError):  # the file changed since training: the answers alone
            examples = []
    out = []
    for i, answer in enumerate(after):
        ex = examples[i] if i < len(examples) else None
        out.append(
            {
                "prompt": prompt_text(ex)[:SAMPLE_CHARS] if ex else None,
                "reference": Encoder.reference(ex)[:SAMPLE_CHARS] if ex else None,
                "before": before[i][:SAMPLE_CHARS] if i < len(before) else None,
                "after": answer[:SAMPLE_CHARS],
            }
        )
    return out


def _job_state(jobs: Jobs, job, doing: str) -> dict | None:
    """A merge or export: running, or how it ended with its last line (the file it wrote, or its error)."""
    if job is None:
        return None
    if jobs.alive(job):
        return {"state": "running", "line": doing}
    outcome = jobs.outcome(job)
    return {"state": outcome.state, "line": outcome.line}


def _listed(name: str) -> bool:
    return bool(name) and not name.startswith(".") and name not in RESERVED and "," not in name


def _children(folder: Path) -> list[str]:
    """The names of the folder's real subfolders that may be runs (or hold them)."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    return [e.name for e in entries if _listed(e.name) and e.is_dir(follow_symlinks=False)]


def _is_run(folder: Path) -> bool:
    return (folder / "config.yaml").is_file() or (folder / "metrics.jsonl").is_file()
