"""`loratune sweep`: trials are ordinary runs trained by `loratune train`; best.yaml reproduces the best one; bad
input is refused in one line before anything is written; a killed worker loses only its running trial, with SQLite
(continue with --name) and with several workers sharing a study on a real PostgreSQL server."""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from conftest import varied_rows, write_jsonl
from optuna.trial import TrialState

from loratune.commands.sweep import add_parser
from loratune.core.errors import UserError
from loratune.sweep.study import open_storage
from loratune.sweep.trial import run_trial

# Until cli.py wires `loratune sweep` (then: [sys.executable, "-m", "loratune", "sweep"]).
SWEEP = [sys.executable, "-m", "loratune", "sweep"]
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
WAIT = 400  # seconds a sweep may take on a busy 2-core machine


@pytest.fixture
def here(tiny_model, tmp_path, monkeypatch) -> Path:
    """A folder with run.yaml (6 steps of the tiny model, validated at every step), where the sweeps run."""
    write_jsonl(tmp_path / "train.jsonl", varied_rows(24))
    write_jsonl(tmp_path / "val.jsonl", varied_rows(4, seed=1))
    (tmp_path / "run.yaml").write_text(
        f"model: {tiny_model}\ntrain_data: train.jsonl\nval_data: val.jsonl\nbatch_size: 4\n"
        "gradient_accumulation_steps: 2\nepochs: 2\neval_every_steps: 1\nmax_length: 128\nprecision: fp32\n"
        "device: cpu\n"
    )
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _sweep(*argv, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*SWEEP, *argv], capture_output=True, text=True, timeout=WAIT, **kwargs)


def _study(name: str, url: str | None = None) -> optuna.Study:
    storage = open_storage(url or f"sqlite:///runs/sweep-{name}/study.db", shared=False)
    return optuna.load_study(study_name=name, storage=storage)


def _wait_for(condition, what: str, workers: list[subprocess.Popen]) -> None:
    end = time.monotonic() + WAIT
    while not condition():
        assert all(w.poll() is None for w in workers), f"a sweep ended before {what}"
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.2)


def _training(folder: Path) -> bool:
    """Whether the run in `folder` has made an optimizer step."""
    metrics = folder / "metrics.jsonl"
    return metrics.is_file() and '"event": "train"' in metrics.read_text()


def test_three_trials_then_best_yaml_reproduces_the_best_trial(here):
    done = _sweep("run.yaml", "--trials", "3")
    assert done.returncode == 0, done.stderr
    study, folder = _study("run"), here / "runs" / "sweep-run"
    assert [t.state in FINISHED for t in study.trials] == [True] * 3
    for t in study.trials:  # ordinary run folders, trained with the trial's values
        config = (folder / f"trial-{t.number:03d}" / "config.yaml").read_text()
        assert f"learning_rate: {t.user_attrs['values']['learning_rate']}\n" in config
        assert t.user_attrs["values"]["lora_alpha"] in [k * t.user_attrs["values"]["lora_r"] for k in (2, 3, 4)]
    for line in ("trial 3 of 3", "best so far", "parameter importances: ", "saved by pruning and early stopping"):
        assert line in done.stdout
    assert (folder / "val_loss.png").stat().st_size > 10_000

    again = subprocess.run(
        [sys.executable, "-m", "loratune", "train", str(folder / "best.yaml")], capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr
    summary = json.loads((folder / "best" / "summary.json").read_text())
    assert summary["best_val_loss"] == pytest.approx(study.best_value, rel=1e-6)


def test_a_trial_worse_than_the_median_is_stopped_with_sigint_and_pruned(here):
    storage = open_storage(f"sqlite:///{here / 'study.db'}", shared=False)
    study = optuna.create_study(storage=storage, pruner=optuna.pruners.MedianPruner(n_startup_trials=2))
    for _ in range(2):  # two trials far better at every step
        study.add_trial(optuna.trial.create_trial(value=0.0, intermediate_values=dict.fromkeys(range(1, 7), 0.0)))
    folder = here / "trial"
    outcome = run_trial(study, storage, study.ask(), "run.yaml", {"learning_rate": 1e-4}, folder, here / "log")
    assert outcome.state == study.trials[-1].state == TrialState.PRUNED
    assert 1 <= outcome.steps < outcome.full_steps == 6
    assert "stopped: SIGINT: checkpoint saved" in (here / "log").read_text()
    assert any((folder / "checkpoints").iterdir())


def _in_process(*argv):
    parser = argparse.ArgumentParser()
    args = add_parser(parser.add_subparsers()).parse_args(list(argv))
    return args.func(args)


@pytest.mark.parametrize(
    "space, message",
    [
        ("learnin_rate: {low: 1.0e-4, high: 2.0e-4}\n", "'learnin_rate' is not a setting; did you mean learning_rate?"),
        ("lora_dropout: {low: 0, high: 1.5}\n", "lora_dropout high 1.5 is outside what lora_dropout allows"),
        ("lora_r: {choices: [8, 0]}\n", "lora_r choice 0 is outside what lora_r allows (an integer > 0)"),
        ("batch_size: {choices: [4, 8]}\n", "batch_size cannot be searched: it comes from the config"),
    ],
)
def test_a_bad_space_file_is_refused_in_one_line_before_anything_is_written(here, space, message):
    (here / "space.yaml").write_text(space)
    with pytest.raises(UserError) as refused:
        _in_process("run.yaml", "--space", "space.yaml", "--trials", "2")
    assert message in str(refused.value) and "\n" not in str(refused.value)
    assert str(refused.value).startswith("space file space.yaml: ")
    assert not (here / "runs").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_storage_gives_one_line_and_writes_nothing(here):
    url = f"postgresql://sweeper:secret@127.0.0.1:{_free_port()}/studies"
    done = _sweep("run.yaml", "--storage", url)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: --storage postgresql://sweeper:***@127.0.0.1:")
    assert "cannot open the study there" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (here / "runs").exists()


def _stop_when_training(argv: list[str], trial: Path, sig: int) -> tuple[int, str]:
    """Run a sweep, send it `sig` once `trial` trains; its exit code and error output."""
    worker = subprocess.Popen([*SWEEP, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: _training(trial), f"{trial.name}'s first step", [worker])
        worker.send_signal(sig)
        return worker.wait(timeout=WAIT), worker.stderr.read()
    finally:
        worker.kill()


def test_stopped_or_killed_mid_trial_then_continued_with_name_counts_every_trial_once(here):
    folder = here / "runs" / "sweep-run"
    # Ctrl-C: the trial checkpoints and counts as failed; the sweep says how to go on
    code, error = _stop_when_training(["run.yaml", "--trials", "1"], folder / "trial-000", signal.SIGINT)
    assert code == 130 and error.startswith("stopped: sweep run: ") and len(error.strip().splitlines()) == 1
    assert "stopped: SIGINT: checkpoint saved" in (folder / "logs" / "trial-000.log").read_text()
    # a kill leaves its trial RUNNING; the trial's training process does not go on alone: the kernel stops it
    # (SIGTERM: a checkpoint, then exit)
    _stop_when_training(["--name", "run"], folder / "trial-001", signal.SIGKILL)
    _wait_for(lambda: "stopped: SIGTERM" in (folder / "logs" / "trial-001.log").read_text(), "the orphan's stop", [])
    assert _study("run").trials[1].state == TrialState.RUNNING

    done = _sweep("--name", "run")
    assert done.returncode == 0, done.stderr
    assert "trial-001: left running by a worker that was stopped or killed: marked failed" in done.stdout
    states = [t.state for t in _study("run").trials]
    assert states[:2] == [TrialState.FAIL] * 2 and states[2] in FINISHED and len(states) == 3


def _pg_bin() -> Path:
    found = shutil.which("initdb") or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))), None)
    if found is None:
        pytest.fail("PostgreSQL's server programs (initdb, pg_ctl) are missing: apt-get install -y postgresql")
    return Path(found).parent


@pytest.fixture
def postgres():
    """A throw-away PostgreSQL server on 127.0.0.1 (as the postgres user when run as root: it refuses root)."""
    bin_dir, root = _pg_bin(), tempfile.mkdtemp(prefix="loratune-pg-")
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(root, "postgres")
    data, port = f"{root}/data", _free_port()
    quiet = {"check": True, "capture_output": True}
    subprocess.run([*as_user, bin_dir / "initdb", "-D", data, "-U", "postgres", "--auth=trust"], **quiet)
    server = [*as_user, bin_dir / "pg_ctl", "-D", data, "-l", f"{root}/log", "-w"]
    subprocess.run([*server, "-o", f"-h 127.0.0.1 -p {port} -k {root}", "start"], **quiet)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*server, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _starts(out: Path) -> list[str]:
    """The trials a worker started, from its progress lines ("trial 2 of 3: trial-001: ...")."""
    return [line.split(": ")[1] for line in out.read_text().splitlines() if " of 3: trial-" in line]


def test_two_workers_share_a_postgresql_study_and_a_killed_one_loses_no_other_trial(here, postgres):
    folder, outs = here / "runs" / "sweep-shared", [here / "a.out", here / "b.out"]
    argv = [*SWEEP, "run.yaml", "--name", "shared", "--trials", "3", "--storage", postgres]
    workers = [subprocess.Popen(argv, stdout=open(out, "w"), stderr=subprocess.STDOUT) for out in outs]

    def training_its_second_trial() -> int | None:
        """The worker that finished a trial first takes the third (the other then waits for it)."""
        second = [i for i, out in enumerate(outs) if len(_starts(out)) == 2 and _training(folder / _starts(out)[1])]
        return second[0] if second else None

    try:
        _wait_for(lambda: training_its_second_trial() is not None, "a worker's second trial", workers)
        victim = training_its_second_trial()
        killed = _starts(outs[victim])
        workers[victim].kill()
        workers[victim].wait()
        assert workers[1 - victim].wait(timeout=WAIT) == 0, outs[1 - victim].read_text()
    finally:  # a failed test leaves no worker behind (their trials stop with them)
        for worker in workers:
            worker.kill()
    kept = _starts(outs[1 - victim])

    trials = {f"trial-{t.number:03d}": t for t in _study("shared", postgres).trials}
    assert trials[killed[1]].state == TrialState.FAIL  # the one running when its worker was killed
    assert trials[killed[0]].state in FINISHED  # the killed worker's finished trial stays
    counted = sorted(name for name, t in trials.items() if t.state in FINISHED)
    assert len(counted) == 3 and sorted([killed[0], *kept]) == counted  # each trial trained by one worker, once
    assert all(t.state in FINISHED or t.user_attrs.get("surplus") for n, t in trials.items() if n != killed[1])
