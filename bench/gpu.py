"""`python -m bench.gpu --out DIR`: loratune on one GPU: speed, memory and the CUDA-only paths, in one command.

1. speed: loratune against HF Trainer + PEFT (dynamic padding) and TRL SFTTrainer + PEFT (padding-free) on the
   shapes of Qwen2.5-0.5B and Llama-3.2-1B with random weights (`bench/shapes.py`), with the CPU benchmark's
   workload, workers and checks (`bench/speed.py`, `bench/worker.py`);
2. memory: `loratune plan`'s estimate against max_memory_allocated, per pass (`bench/gpu_memory.py`) and per run;
3. the CUDA-only paths as checks that say ok or failed (`bench/gpu_checks.py`).

Every part runs in processes of its own with a time limit, and the whole within `--budget-s`: a part that fails
or runs out of time is reported and the next one runs. DIR gets gpu.json and gpu.md, rewritten after each part.
`--device cpu` runs the same at tiny sizes (a check of the harness; the CUDA-only checks are skipped).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

import torch

from loratune.core.device import DTYPES, choose_dtype

from .flops import matmul_peak
from .gpu_checks import CHECKS, skip_reason
from .gpu_report import render
from .report import TRAINERS, machine, summarize
from .shapes import SHAPES, describe, write_model
from .speed import HYPER, Setting, bench_model, log_tail, run_logged

# 10 steps of 32 examples on a GPU (steps 2-10 are timed, the first warms up); a few small steps on a CPU.
SETTINGS = {"cuda": Setting(steps=10, batch_size=8, grad_accum=4), "cpu": Setting(steps=3, batch_size=4, grad_accum=2)}
SKIP_STEPS = 1
# Seconds each process may take at most (less when the budget has less left).
LIMITS = {
    "worker": 150,
    "memory": 180,
    "flash_varlen": 60,
    "fused_adamw": 60,
    "oom_replay": 150,
    "batch_auto": 150,
    "liger_kernels": 120,
    "qlora": 120,
    "torch_compile": 200,
}
MIN_START = 15  # a process with less time than this left is not started
OPTIONAL = ("liger_kernel", "bitsandbytes", "flash_attn")  # TRL is in the machine line


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def limit(self, cap: float) -> float:
        """The time limit for a process that may take `cap` seconds; 0 when too little is left to start one."""
        left = self.end - time.monotonic()
        return min(cap, left) if left >= MIN_START else 0.0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for gpu.json and gpu.md (e.g. bench/results)")
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available (cpu: tiny sizes)")
    p.add_argument("--budget-s", type=float, default=450, help="time for everything, in seconds (default 450)")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated subset of {', '.join(SHAPES)}")
    p.add_argument("--parts", default="speed,memory,checks", help="comma-separated subset of speed, memory, checks")
    p.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated subset of {', '.join(CHECKS)}")
    p.add_argument("--work", type=Path, help="keep models, runs and logs here (default: a temporary folder)")
    args = p.parse_args(argv)
    shapes, parts, checks = args.shapes.split(","), args.parts.split(","), args.checks.split(",")
    for chosen, allowed in ((shapes, SHAPES), (parts, ("speed", "memory", "checks")), (checks, CHECKS)):
        if unknown := [x for x in chosen if x not in allowed]:
            p.error(f"unknown {unknown[0]!r}; choose from {', '.join(allowed)}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: PyTorch sees no CUDA GPU here")

    run = Run(args.out, device, Deadline(args.budget_s), " ".join(["python -m bench.gpu", *(argv or sys.argv[1:])]))
    with tempfile.TemporaryDirectory(prefix="loratune-gpu-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        run.part("matrix-product peak", run.measure_peaks)
        run.part("models", lambda: run.write_models(shapes, work / "models"))
        if "speed" in parts:
            for shape in shapes:
                run.part(f"speed {shape}", lambda shape=shape: run.speed(shape, work / "speed" / shape))
        if "memory" in parts:
            run.part("memory", lambda: run.memory(work))
        if "checks" in parts:
            for name in checks:
                run.part(f"check {name}", lambda name=name: run.check(name, work))
    run.report["seconds"] = time.monotonic() - run.start
    run.save()
    print(render(run.report))
    print(f"written to {args.out / 'gpu.md'} and gpu.json")


class Run:
    """The results so far, written out after every part."""

    def __init__(self, out: Path, device: str, deadline: Deadline, command: str):
        self.out, self.device, self.deadline, self.start = out, device, deadline, time.monotonic()
        dtype = choose_dtype("auto", torch.device(device))
        self.precision = "bf16" if dtype == torch.bfloat16 else "fp32"
        self.report = {
            "command": command,
            "device": device,
            "tiny": device != "cuda",
            "precision": self.precision,
            "machine": machine(device),
            "packages": {name: _version(name) for name in OPTIONAL},
            "hyperparameters": HYPER,
            "peak_flops": {},
            "models": {},
            "speed": {},
            "memory": {},
            "checks": {},
            "failures": {},
        }
        out.mkdir(parents=True, exist_ok=True)

    def part(self, name: str, fn) -> None:
        """Run one part; an error is recorded and the next part runs."""
        print(f"\n== {name} ({time.monotonic() - self.start:.0f}s in)", flush=True)
        try:
            fn()
        except Exception as e:
            traceback.print_exc()
            self.report["failures"][name] = f"{type(e).__name__}: {e}".splitlines()[0][:500]
        self.save()

    def save(self) -> None:
        (self.out / "gpu.json").write_text(json.dumps(self.report, indent=1))
        (self.out / "gpu.md").write_text(render(self.report))

    def measure_peaks(self) -> None:
        self.report["peak_flops"] = {name: matmul_peak(DTYPES[name], self.device) for name in ("fp32", "bf16")}
        if self.device == "cuda":  # the runs that follow are other processes: give them the cached blocks back
            torch.cuda.empty_cache()

    def write_models(self, shapes: list[str], folder: Path) -> None:
        tiny = self.device != "cuda"
        dtype = DTYPES[self.precision] if not tiny else torch.float32
        for shape in shapes:
            path = write_model(folder / shape, shape, tiny, self.device, dtype)
            self.report["models"][shape] = {"path": path, "label": describe(shape, tiny)}

    def speed(self, shape: str, work: Path) -> None:
        model = self.report["models"][shape]
        setting = SETTINGS[self.device]
        trainers = [t for t in TRAINERS if t != "trl" or importlib.util.find_spec("trl")]
        runs = bench_model(
            model["path"],
            model["label"],
            setting,
            trainers,
            1,
            self.device,
            self.precision,
            work,
            timeout=lambda: self.deadline.limit(LIMITS["worker"]),
            keep_going=True,
        )
        not_run = {} if "trl" in trainers else {"trl": "trl is not installed"}
        entry = {"setting": asdict(setting), "failed": runs["failed"], "not_run": not_run} | runs["workload"]
        if runs["results"]:
            entry |= summarize(runs, self.report["peak_flops"], self.precision, skip_steps=SKIP_STEPS)
        self.report["speed"][shape] = entry | {"runs": runs["results"]}

    def _context(self, work: Path) -> Path:
        path = work / "context.json"
        models = {shape: m["path"] for shape, m in self.report["models"].items()}
        context = {"device": self.device, "work": str(work / "runs"), "models": models}
        path.write_text(json.dumps(context | {"check_model": models.get("qwen2.5-0.5b", next(iter(models.values())))}))
        (work / "runs").mkdir(exist_ok=True)
        return path

    def memory(self, work: Path) -> None:
        results, log = work / "memory.jsonl", work / "memory.log"
        results.unlink(missing_ok=True)
        code = self._spawn("bench.gpu_memory", [str(self._context(work)), str(results)], log, LIMITS["memory"])
        rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
        self.report["memory"] = {"cases": rows}
        if code != 0:
            self.report["memory"]["stopped"] = self._why(code, log)

    def check(self, name: str, work: Path) -> None:
        start = time.monotonic()
        if reason := skip_reason(name, self.device):
            self.report["checks"][name] = {"status": "skipped", "detail": reason}
            return
        result, log = work / f"check-{name}.json", work / f"check-{name}.log"
        code = self._spawn("bench.gpu_checks", [name, str(self._context(work)), str(result)], log, LIMITS[name])
        if result.exists():
            outcome = json.loads(result.read_text())
        elif code == "out of time":
            outcome = {"status": "skipped", "detail": "not started: the time budget was spent"}
        else:
            outcome = {"status": "failed", "detail": self._why(code, log)}
        self.report["checks"][name] = outcome | {"seconds": time.monotonic() - start}
        if outcome["status"] == "failed":
            self.report["checks"][name]["log"] = log_tail(log, 15)

    def _spawn(self, module: str, args: list[str], log: Path, cap: float):
        """Run `python -m module args` within its limit; its exit code, None when killed at the limit, or "out of
        time" when the budget had too little left to start it."""
        limit = self.deadline.limit(cap)
        if not limit:
            log.write_text("not started: the time budget was spent\n")
            return "out of time"
        return run_logged([sys.executable, "-m", module, *args], log, limit)

    @staticmethod
    def _why(code, log: Path) -> str:
        if code == "out of time":
            return "not started: the time budget was spent"
        if code is None:
            return "killed at its time limit; end of its log: " + log_tail(log, 3).replace("\n", " | ")
        return f"exit {code}; end of its log: " + log_tail(log, 3).replace("\n", " | ")


def _version(name: str) -> str | None:
    if importlib.util.find_spec(name) is None:
        return None
    try:
        return metadata.version(name.replace("_", "-"))
    except metadata.PackageNotFoundError:
        return "installed"


if __name__ == "__main__":
    main()
