"""`python -m bench.startup`: how long `loratune train` takes as a whole process, and how soon it starts training.

Two runs of the tiny benchmark model (`bench/speed.py`'s TINY) on 128 generated examples (`bench/workload.py`):

- epoch: one epoch at the Training Guide's defaults (2 optimizer steps of 64 examples, validation at the end);
- one step: `--max-steps 1` with validation, saving and the report, the shortest complete run.

Each is run `--reps` times in fresh processes. "first step" is the time from starting the process to the start of
its first optimizer step: the launcher watches metrics.jsonl and subtracts the step's own `seconds` from the
moment its first line appears. Medians are printed; the file cache is warmed by one run that is not counted.
`--pythonpath DIR` times another checkout of loratune with the same Python (for before/after comparisons).

Two commands that load no model are timed the same way, whole processes: `loratune --help` and `loratune config
show --preset quickstart`. Every time is printed beside the floor, measured in the same run: a bare Python that
imports torch, transformers, peft and accelerate (and exits as loratune does), what any training process pays
before loratune does anything (a run imports more: transformers loads a model's own modules on first use). A run's
first step beyond the floor is what loratune adds before training (its data, model and adapters); the commands
without a model import none of those libraries and should stay far below the floor.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

N_EXAMPLES = 128
# gc.freeze() as `loratune` does before it exits (cli.run): without it, the interpreter's last collection over torch's
# objects adds about a second to the floor that no loratune process pays.
FLOOR = "import gc, torch, transformers, peft, accelerate; gc.freeze()"
COMMANDS = {
    "--help": ["--help"],
    "config show": ["config", "show", "--preset", "quickstart"],
}
RUNS = {
    "epoch": ["--epochs", "1"],
    "one step": ["--max-steps", "1"],
}


def prepare(work: Path) -> tuple[str, str]:
    from loratune.modeling.tiny import make_tiny_model

    from .speed import HYPER, TINY
    from .workload import make_workload

    model = make_tiny_model(work / "model", **TINY)
    from transformers import AutoTokenizer

    data = make_workload(AutoTokenizer.from_pretrained(model), N_EXAMPLES, HYPER["seed"]).write_jsonl(
        work / "train.jsonl"
    )
    return str(model), str(data)


def time_process(argv: list[str], env: dict, cwd: Path) -> float:
    """Seconds from starting `argv` to its exit."""
    start = time.perf_counter()
    result = subprocess.run(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{result.stderr[-2000:]}")
    return seconds


def timed(argv: list[str], env: dict, cwd: Path, reps: int) -> list[float]:
    time_process(argv, env, cwd)  # warms the file cache
    return [time_process(argv, env, cwd) for _ in range(reps)]


def spread(seconds: list[float]) -> str:
    return f"{statistics.median(seconds):.2f} s (min {min(seconds):.2f}, max {max(seconds):.2f})"


def over(seconds: list[float], floor: float) -> str:
    return f"{statistics.median(seconds) - floor:+.2f} s over the floor"


def time_run(args: list[str], run_dir: Path, env: dict) -> tuple[float, float]:
    """(seconds to the first optimizer step's start, seconds for the whole process)."""
    metrics = run_dir / "metrics.jsonl"
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "loratune", "train", *args, "--output-dir", str(run_dir)],
        env=env,
        cwd=run_dir.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = None
    while process.poll() is None:
        if first is None and metrics.is_file():
            seconds = _first_step_seconds(metrics.read_text())
            if seconds is not None:
                first = time.perf_counter() - start - seconds
        time.sleep(0.005)
    whole = time.perf_counter() - start
    if process.returncode != 0:
        raise SystemExit(f"loratune train failed:\n{process.stderr.read()[-2000:]}")
    if first is None:  # the run ended between two looks: read the line now
        first = whole - _first_step_seconds(metrics.read_text())
    return first, whole


def _first_step_seconds(text: str) -> float | None:
    """The first optimizer step's own seconds, once its line is written whole (phase lines come before it)."""
    for line in text.splitlines(keepends=True):
        if line.endswith("}\n") and '"event": "train"' in line:
            return json.loads(line)["seconds"]
    return None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.startup", description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--pythonpath", help="a loratune checkout to time instead of the installed one")
    args = p.parse_args(argv)
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if args.pythonpath:
        env["PYTHONPATH"] = args.pythonpath
    with tempfile.TemporaryDirectory(prefix="loratune-startup-") as tmp:
        work = Path(tmp)
        env["LORATUNE_CACHE"] = str(work / "cache")
        floors = timed([sys.executable, "-c", FLOOR], env, work, args.reps)
        floor = statistics.median(floors)
        print(f"floor (`python -c '{FLOOR}'`): {spread(floors)}; medians of {args.reps}", flush=True)
        for name, command in COMMANDS.items():
            seconds = timed([sys.executable, "-m", "loratune", *command], env, work, args.reps)
            print(f"{name}: whole process {spread(seconds)}, {over(seconds, floor)}", flush=True)
        model, data = prepare(work)
        common = ["--model", model, "--train-data", data]
        for name, extra in RUNS.items():
            time_run(common + extra, work / f"{name}-warm", env)  # warms the file and token caches
            firsts, wholes = zip(*(time_run(common + extra, work / f"{name}-{i}", env) for i in range(args.reps)))
            print(
                f"{name}: first step at {spread(firsts)}, {over(firsts, floor)}; whole process {spread(wholes)}, "
                f"{over(wholes, floor)}",
                flush=True,
            )


if __name__ == "__main__":
    main()
