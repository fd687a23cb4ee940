"""`loratune plan`'s peak and time against a real run of each preset, as a markdown table for
docs/memory-accuracy.md.

    python -m bench.process_peak                     # every preset on the built-in model and quickstart data
    python -m bench.process_peak --presets quickstart

Each preset runs as `loratune train --preset P` (a separate process, as a user runs it) on the built-in model and
the quickstart data, with `--epochs 1`; the presets other than quickstart with `--max-steps 2` (quick) or 1
and no test set, to keep them short. Planned: `loratune plan --json` with the same flags: its total and time.
Measured: the run's summary.json peak (the process's resident high-water mark on CPU, CUDA tensors on a GPU), its
training time, and, sampled every 0.2 s, the resident memory of the process in each of its phases (metrics.jsonl's
phase lines), to show where the peak is.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loratune.core.presets import _quickstart_data

PRESETS = {  # preset: extra flags; the others run 2 steps on the built-in model and the quickstart data, no test set
    "quickstart": [],
    "quick": ["--max-steps", "2"],
    "balanced": ["--max-steps", "1"],
    "memory_saver": ["--max-steps", "1"],
    "high_capacity": ["--max-steps", "1"],
}
DATA = ["--model", "smollm2-135m"] + [f"--{s}-data={_quickstart_data(s)}" for s in ("train", "val")]


def rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def last_phase(metrics: Path) -> str:
    try:
        lines = metrics.read_text().splitlines()
    except OSError:
        return "loading"
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == "phase":
            return record["phase"]
    return "loading"


def run(preset: str, flags: list[str], out: Path) -> dict:
    """The plan of the preset's run, then the run, sampled."""
    args = ["--preset", preset, *flags, "--epochs", "1", "--output-dir", str(out)]
    plan = subprocess.run([sys.executable, "-m", "loratune", "plan", *args, "--json"], capture_output=True, text=True)
    if plan.returncode:
        raise SystemExit(f"{preset}: plan failed: {plan.stderr[-2000:]}")
    planned = json.loads(plan.stdout[plan.stdout.index("{") :])
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "loratune", "train", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    by_phase: dict[str, int] = {}
    while proc.poll() is None:
        phase = last_phase(out / "metrics.jsonl")
        by_phase[phase] = max(by_phase.get(phase, 0), rss(proc.pid))
        time.sleep(0.2)
    if proc.returncode:
        raise SystemExit(f"{preset}: train failed: {proc.stderr.read()[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {
        "preset": preset,
        "planned": planned["total"],
        "items": planned["items"],
        "planned_seconds": planned["epoch_seconds"],
        "planned_range": planned["epoch_seconds_range"],
        "steps_per_epoch": planned["resolved"]["steps_per_epoch"],
        "peak": summary["peak_memory_bytes"],
        "peak_of": summary["peak_memory_of"],
        "train_seconds": summary["train_seconds"],
        "steps": summary["steps"],
        "wall_seconds": time.perf_counter() - start,
        "by_phase": by_phase,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="*", default=list(PRESETS))
    parser.add_argument("--json", type=Path, help="also write every result here")
    args = parser.parse_args()
    results = []
    print("| preset | steps | plan GiB | summary peak GiB | plan / summary | peak by phase (GiB) |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            flags = PRESETS[preset] + ([] if preset == "quickstart" else DATA)
            r = run(preset, flags, Path(tmp) / preset)
            results.append(r)
            phases = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in r["by_phase"].items())
            print(
                f"| {preset} | {r['steps']} | {r['planned'] / 2**30:.2f} | {r['peak'] / 2**30:.2f} | "
                f"{r['planned'] / r['peak']:.2f} | {phases} |",
                flush=True,
            )
    print("\n| preset | steps | planned time for them | likely range | training time | measured / planned |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        share = r["steps"] / r["steps_per_epoch"]  # the plan is of a whole epoch
        planned = (r["planned_seconds"] or 0) * share
        low, high = (s * share for s in r["planned_range"]) if r["planned_range"] else (0, 0)
        print(
            f"| {r['preset']} | {r['steps']} | {planned:.0f} s | {low:.0f}-{high:.0f} s | {r['train_seconds']:.0f} s | "
            f"{r['train_seconds'] / planned:.2f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
