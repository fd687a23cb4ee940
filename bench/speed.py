"""The speed comparison of one model: generate the workload, run each trainer in its own process, collect results.

Shared by the CPU benchmark (`python -m bench`) and the GPU one (`python -m bench.gpu`): the model folder, device,
number format and step settings are the caller's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loratune.data.plan import StepPlan
from loratune.modeling.model import load_tokenizer

from .flops import model_flops
from .report import ROOT, TRAINERS
from .workload import make_workload


@dataclass
class Setting:
    steps: int
    batch_size: int
    grad_accum: int


# Training Guide defaults, the same for every trainer.
HYPER = dict(
    learning_rate=2e-4, warmup_ratio=0.05, lora_r=8, lora_alpha=32, lora_dropout=0.05, max_length=1024, seed=42
)
TINY = dict(hidden_size=256, layers=4, heads=4, kv_heads=2, vocab_size=1024)


class WorkerFailed(RuntimeError):
    """A trainer's run ended with an error or ran out of time; the message ends with its log's last lines."""


def bench_model(
    model_path: str,
    label: str,
    setting: Setting,
    trainers: list[str],
    reps: int,
    device: str,
    precision: str,
    work: Path,
    timeout: Callable[[], float] | None = None,
    keep_going: bool = False,
    use_dora: bool = False,
) -> dict:
    """Every trainer `reps` times (interleaved) on the same workload. `timeout()` gives each run's time limit
    (0: no time left, the run is not started). With `keep_going`, a failed run is recorded in "failed" and the
    others go on; otherwise it raises WorkerFailed."""
    work.mkdir(parents=True)
    per_step = setting.batch_size * setting.grad_accum
    n = setting.steps * per_step  # exactly one epoch of whole steps
    workload = make_workload(load_tokenizer(model_path), n, HYPER["seed"])
    lengths, targets = workload.lengths, workload.targets
    if lengths.max() > HYPER["max_length"]:
        raise SystemExit(f"an example has {lengths.max()} tokens, more than max_length")
    # loratune shuffles the rows itself; the reference trainers read them in the order it will use.
    steps = StepPlan(lengths, targets, per_step, setting.batch_size, seed=HYPER["seed"]).epoch(0)
    order = np.concatenate(steps).tolist()
    tokens = work / "tokens.json"
    tokens.write_text(
        json.dumps({"input_ids": [workload.input_ids[i] for i in order], "labels": [workload.labels[i] for i in order]})
    )
    base = dict(
        model_path=model_path,
        data=str(workload.write_jsonl(work / "train.jsonl")),
        tokens=str(tokens),
        device=device,
        precision=precision,
        steps=setting.steps,
        batch_size=setting.batch_size,
        grad_accum=setting.grad_accum,
        use_dora=use_dora,  # every trainer with PEFT's DoRA
        objective="sft",
        **HYPER,
    )
    stats = {
        "label": label,
        "examples": n,
        "tokens": int(lengths.sum()),
        "targets": int(targets.sum()),
        "flops": model_flops(model_path, lengths, targets, HYPER["lora_r"]),
        "step_tokens": [int(lengths[s].sum()) for s in steps],
        "step_flops": [model_flops(model_path, lengths[s], targets[s], HYPER["lora_r"]) for s in steps],
        "length_median": int(np.median(lengths)),
        "length_p90": int(np.percentile(lengths, 90)),
        "length_max": int(lengths.max()),
    }
    print(
        f"\n{label}: {n} examples, {stats['tokens']:,} tokens ({stats['targets']:,} answer targets), lengths median "
        f"{stats['length_median']}, p90 {stats['length_p90']}, max {stats['length_max']}",
        flush=True,
    )

    results, failed = repeat(base, trainers, TRAINERS, reps, work, timeout=timeout, keep_going=keep_going)
    return {"results": results, "workload": stats, "failed": failed}


def repeat(
    base: dict,
    trainers: list[str],
    names: dict[str, str],
    reps: int,
    work: Path,
    extra: Callable[[str, int], dict] = lambda trainer, rep: {},
    timeout: Callable[[], float] | None = None,
    keep_going: bool = False,
) -> tuple[dict, dict]:
    """Every trainer's run of the `base` spec (plus `extra(trainer, rep)`), `reps` times interleaved, each in a
    process of its own; the results per trainer, and the error of each trainer that failed (with `keep_going`)."""
    results, failed = {t: [] for t in trainers}, {}
    for rep in range(reps):
        for trainer in trainers:
            if trainer in failed:
                continue
            run_dir = work / f"{trainer}-{rep}"
            limit = timeout() if timeout else None
            spec = base | extra(trainer, rep) | {"trainer": trainer, "out_dir": str(run_dir / "output")}
            try:
                if limit == 0:
                    raise WorkerFailed(f"{trainer} not started: the time budget was spent")
                result = run_worker(spec, run_dir, limit)
            except WorkerFailed as e:
                if not keep_going:
                    raise
                failed[trainer] = str(e)
                print(f"  rep {rep + 1}/{reps} {names[trainer]:<40} FAILED: {str(e).splitlines()[0]}", flush=True)
                continue
            results[trainer].append(result)
            cuda = "peak_cuda_mib" in result
            memory = f"peak {'CUDA' if cuda else 'RSS'} {result['peak_cuda_mib' if cuda else 'peak_rss_mib']:.0f} MiB"
            print(
                f"  rep {rep + 1}/{reps} {names[trainer]:<40} {result['tokens'] / result['seconds']:9.1f} real "
                f"tokens/s  loss {result['losses'][-1]:.4f}  {memory}",
                flush=True,
            )
    return {t: r for t, r in results.items() if t not in failed}, failed


def run_worker(spec: dict, run_dir: Path, timeout: float | None = None) -> dict:
    """One run of `bench.worker` in its own process; raises WorkerFailed with the end of its log."""
    run_dir.mkdir(parents=True)
    spec_file, result_file, log = run_dir / "spec.json", run_dir / "result.json", run_dir / "log.txt"
    spec_file.write_text(json.dumps(spec))
    start = time.perf_counter()
    command = [sys.executable, "-m", "bench.worker", str(spec_file), str(result_file)]
    returncode = run_logged(command, log, timeout)
    if returncode != 0:
        reason = f"exit {returncode}" if returncode is not None else f"out of time after {timeout:.0f}s"
        raise WorkerFailed(f"{spec['trainer']} failed ({reason}); end of its log:\n{log_tail(log)}")
    return json.loads(result_file.read_text()) | {"process_seconds": time.perf_counter() - start}


def run_logged(command: list[str], log: Path, timeout: float | None = None) -> int | None:
    """Run `command` from the repository with its output in `log`; its exit code, or None when it ran out of time
    (then it is killed)."""
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
    }
    with open(log, "w") as f:
        # Its own process group, so that running out of time also ends what it started (e.g. compile workers).
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        finally:
            if process.returncode is None:  # out of time, or this process was interrupted
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def log_tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
