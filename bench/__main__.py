"""`python -m bench`: the same LoRA training with (a) HF Trainer + PEFT, (b) TRL SFTTrainer + PEFT and (c) loratune.

For each model: generate the workload, then run every trainer `--reps` times (interleaved, each run in its own
process), and print real-token throughput, peak memory, losses and MFU, medians over the repetitions, with the
ratios to (a) computed within this run. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from loratune.core.device import DTYPES, choose_dtype
from loratune.data.plan import StepPlan
from loratune.modeling.model import load_tokenizer, resolve_model
from loratune.modeling.tiny import make_tiny_model

from .flops import matmul_peak, model_flops
from .report import ROOT, TRAINERS, machine, render, summarize
from .workload import make_workload


@dataclass
class Setting:
    steps: int
    batch_size: int
    grad_accum: int


# batch_size 8 as the Training Guide's default (padding depends on it). The 135M model gets a smaller step and fewer
# of them: on a 2-core CPU each of its runs takes minutes.
FULL = {
    "tiny": Setting(steps=8, batch_size=8, grad_accum=8),
    "smollm2-135m": Setting(steps=2, batch_size=8, grad_accum=4),
}
QUICK = {
    "tiny": Setting(steps=3, batch_size=4, grad_accum=2),
    "smollm2-135m": Setting(steps=2, batch_size=4, grad_accum=2),
}
# Training Guide defaults, the same for every trainer.
HYPER = dict(
    learning_rate=2e-4, warmup_ratio=0.05, lora_r=8, lora_alpha=32, lora_dropout=0.05, max_length=1024, seed=42
)
TINY = dict(hidden_size=256, layers=4, heads=4, kv_heads=2, vocab_size=1024)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small settings and 1 repetition, to check the harness")
    p.add_argument("--models", default="tiny,smollm2-135m", help="comma-separated: tiny, smollm2-135m")
    p.add_argument("--trainers", default=",".join(TRAINERS), help="comma-separated subset of hf, trl, loratune")
    p.add_argument("--reps", type=int, help="repetitions per trainer (default 3, or 1 with --quick)")
    p.add_argument("--steps", type=int, help="optimizer steps (default per model)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        help="number format of the frozen base, for all "
        "trainers (default: what loratune's precision auto picks here: bf16 on CUDA, and on a CPU whose "
        "bf16 matrix products are measured faster than fp32; else fp32)",
    )
    p.add_argument(
        "--work",
        type=Path,
        help="keep the models, data, logs and runs here (default: a temporary folder, removed at the end)",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="where the table goes (default bench/results/latest.{md,json} for a "
        "full run, quick.{md,json} with --quick, partial.{md,json} for a subset of models or trainers)",
    )
    args = p.parse_args(argv)
    models, trainers = args.models.split(","), args.trainers.split(",")
    for chosen, allowed in ((models, FULL), (trainers, TRAINERS)):
        if unknown := [x for x in chosen if x not in allowed]:
            p.error(f"unknown {unknown[0]!r}; choose from {', '.join(allowed)}")
    if args.work and (taken := [m for m in models if (args.work / m).exists()]):
        p.error(f"--work {args.work} already holds a run of {taken[0]}; give an empty or new folder")

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.precision or ("bf16" if choose_dtype("auto", torch.device(device)) == torch.bfloat16 else "fp32")
    reps = args.reps or (1 if args.quick else 3)
    full = set(models) == set(FULL) and set(trainers) == set(TRAINERS)
    out = args.out or ROOT / "bench" / "results" / ("quick" if args.quick else "latest" if full else "partial")
    host = machine(device)  # first: its reading of how busy the CPU is must not include our own work
    print(f"measuring the {device} matrix-product peak ...", flush=True)
    peaks = {name: matmul_peak(DTYPES[name], device) for name in ("fp32", "bf16")}
    report = {
        "machine": host,
        "device": device,
        "precision": precision,
        "reps": reps,
        "quick": args.quick,
        "peak_flops": peaks,
        "hyperparameters": HYPER,
        "models": {},
    }

    with tempfile.TemporaryDirectory(prefix="loratune-bench-") as tmp:
        work = args.work or Path(tmp)
        for name in models:
            setting = (QUICK if args.quick else FULL)[name]
            if args.steps:
                setting = Setting(args.steps, setting.batch_size, setting.grad_accum)
            runs = bench_model(name, setting, trainers, reps, device, precision, work / name)
            report["models"][name] = summarize(runs, peaks, precision) | {"setting": asdict(setting)} | runs["workload"]
            report["models"][name]["runs"] = runs["results"]

    text = render(report)
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    print(f"written to {out.with_suffix('.md')} and .json")


def bench_model(
    name: str, setting: Setting, trainers: list[str], reps: int, device: str, precision: str, work: Path
) -> dict:
    work.mkdir(parents=True)
    model_path = str(make_tiny_model(work / "model", **TINY)) if name == "tiny" else resolve_model(name)
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
        **HYPER,
    )
    stats = {
        "label": _label(name, model_path),
        "examples": n,
        "tokens": int(lengths.sum()),
        "targets": int(targets.sum()),
        "flops": model_flops(model_path, lengths, targets, HYPER["lora_r"]),
        "length_median": int(np.median(lengths)),
        "length_p90": int(np.percentile(lengths, 90)),
        "length_max": int(lengths.max()),
    }
    print(
        f"\n{name}: {n} examples, {stats['tokens']:,} tokens ({stats['targets']:,} answer targets), lengths median "
        f"{stats['length_median']}, p90 {stats['length_p90']}, max {stats['length_max']}",
        flush=True,
    )

    results = {t: [] for t in trainers}
    for rep in range(reps):
        for trainer in trainers:
            run_dir = work / f"{trainer}-{rep}"
            result = run_worker(base | {"trainer": trainer, "out_dir": str(run_dir / "output")}, run_dir)
            results[trainer].append(result)
            print(
                f"  rep {rep + 1}/{reps} {TRAINERS[trainer]:<40} {result['tokens'] / result['seconds']:9.1f} real "
                f"tokens/s  loss {result['losses'][-1]:.4f}  peak RSS {result['peak_rss_mib']:.0f} MiB",
                flush=True,
            )
    return {"results": results, "workload": stats}


def run_worker(spec: dict, run_dir: Path) -> dict:
    run_dir.mkdir(parents=True)
    spec_file, result_file, log = run_dir / "spec.json", run_dir / "result.json", run_dir / "log.txt"
    spec_file.write_text(json.dumps(spec))
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
    }
    start = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run(
            [sys.executable, "-m", "bench.worker", str(spec_file), str(result_file)],
            cwd=ROOT,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    if done.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise SystemExit(f"{spec['trainer']} failed (exit {done.returncode}); end of its log:\n{tail}")
    return json.loads(result_file.read_text()) | {"process_seconds": time.perf_counter() - start}


def _label(name: str, model_path: str) -> str:
    if name == "tiny":
        return (
            f"tiny random Llama (hidden {TINY['hidden_size']}, {TINY['layers']} layers, {TINY['heads']} heads, "
            f"vocab {TINY['vocab_size']})"
        )
    return f"{name} ({Path(model_path).name})"


if __name__ == "__main__":
    main()
