"""The preference demo measured end to end, as the README gives it: the quickstart SFT run, `loratune pairs` on its
240 training prompts, and DPO on top of it (`--preset quickstart_dpo`), each command a process of its own in an
empty folder.

    python -m bench.demo_dpo                       # the built-in model, the presets' settings
    python -m bench.demo_dpo --model tiny          # a random tiny Llama: a check of the script in minutes
    python -m bench.demo_dpo -- --learning-rate 1e-4 --epochs 5   # flags after -- go to the DPO run

Prints, and writes as markdown (`--out`): each command's wall time and peak resident memory (the process's, from the
kernel's accounting at its exit), how many training answers were right and wrong, and the held-out exact match of
the SFT run (before/after) and of the DPO run (before: the SFT run's model, merged; after) on the same 48 prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .report import ROOT, machine, machine_line


def timed(command: list[str], cwd: Path) -> dict:
    """Run a `loratune` command; its wall time, peak RSS and output (it must succeed)."""
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "loratune", *command], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env=os.environ | {"PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    print(output[-3000:], flush=True)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"loratune {' '.join(command)} failed")
    return {"command": "loratune " + " ".join(command), "seconds": seconds, "peak_gib": usage.ru_maxrss / 2**20,
            "output": output}  # fmt: skip


def exact(summary: dict, when: str) -> float:
    return summary[f"test_{when}"]["exact_match"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.demo_dpo", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="the quickstart's model (default), or tiny")
    p.add_argument("--work", type=Path, help="keep the runs here (default: a temporary folder)")
    p.add_argument("--out", type=Path, help="write the table here as markdown")
    p.add_argument("dpo_flags", nargs="*", help="after --: flags for the DPO run")
    args = p.parse_args(argv)
    host = machine("cpu")
    with tempfile.TemporaryDirectory(prefix="loratune-demo-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model = args.model
        if model == "tiny":
            from loratune.modeling.tiny import make_tiny_model

            model = str(make_tiny_model(work / "tiny"))
        steps = [
            timed(["train", "--preset", "quickstart", "--model", model], work),
            timed(["pairs", "runs/quickstart"], work),
            timed(["train", "--preset", "quickstart_dpo", "--model", model, *args.dpo_flags], work),
        ]
        runs = work / "runs"
        sft, dpo = (json.loads((runs / r / "summary.json").read_text()) for r in ("quickstart", "quickstart-dpo"))
    answered = re.search(r"(\d+) prompts answered, (\d+) right, (\d+) wrong", steps[1]["output"]).groups()
    written = (re.search(r"(\d+) pairs written", steps[1]["output"]) or [0, 0])[1]
    lines = [
        "## The preference demo on the quickstart (`python -m bench.demo_dpo`)",
        "",
        machine_line(host),
        "",
        "| command | wall time | peak RSS |",
        "| --- | ---: | ---: |",
        *(f"| `{s['command']}` | {s['seconds'] / 60:.1f} min | {s['peak_gib']:.2f} GiB |" for s in steps),
        "",
        f"Training answers: {answered[0]} answered, {answered[1]} right, {answered[2]} wrong; {written} pairs "
        f"written; DPO: {dpo['steps']} steps, {dpo['pairs']} pairs processed over its epochs.",
        f"Held-out exact match (48 prompts): base model {exact(sft, 'before'):.1%}, SFT run {exact(sft, 'after'):.1%}; "
        f"the DPO run's start (the SFT run's model, merged) {exact(dpo, 'before'):.1%}, after DPO "
        f"{exact(dpo, 'after'):.1%}.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
