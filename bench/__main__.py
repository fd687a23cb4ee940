"""`python -m bench`: the same LoRA training with (a) HF Trainer + PEFT, (b) TRL SFTTrainer + PEFT and (c) loratune.

For each model: generate the workload, then run every trainer `--reps` times (interleaved, each run in its own
process), and print real-token throughput, peak memory, losses and MFU, medians over the repetitions, with the
ratios to (a) computed within this run. `--objective dpo` runs the DPO workload instead (bench/dpo.py): TRL's
DPOTrainer + PEFT and loratune on the same preference pairs. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from loratune.core.device import DTYPES, choose_dtype
from loratune.modeling.model import resolve_model
from loratune.modeling.tiny import make_tiny_model

from . import dpo
from .dpo_report import render_dpo
from .flops import matmul_peak
from .report import ROOT, TRAINERS, machine, render, summarize
from .speed import HYPER, TINY, Setting, WorkerFailed, bench_model

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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small settings and 1 repetition, to check the harness")
    p.add_argument(
        "--objective",
        choices=("sft", "dpo"),
        default="sft",
        help="sft: instruction/answer examples, HF Trainer, TRL SFTTrainer and loratune; dpo: preference pairs, TRL "
        "DPOTrainer (the reference in every step, or precomputed) and loratune (a fresh reference cache, or the one "
        "its previous run filled)",
    )
    p.add_argument("--models", default="tiny,smollm2-135m", help="comma-separated: tiny, smollm2-135m")
    p.add_argument(
        "--trainers",
        help=f"comma-separated subset of {', '.join(TRAINERS)} (sft) or {', '.join(dpo.TRAINERS)} (dpo); default all",
    )
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
    p.add_argument("--use-dora", action="store_true", help="every trainer trains DoRA (PEFT's) instead of LoRA")
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
    is_dpo = args.objective == "dpo"
    known = dpo.TRAINERS if is_dpo else TRAINERS
    models, trainers = args.models.split(","), args.trainers.split(",") if args.trainers else list(known)
    for chosen, allowed in ((models, FULL), (trainers, known)):
        if unknown := [x for x in chosen if x not in allowed]:
            p.error(f"unknown {unknown[0]!r}; choose from {', '.join(allowed)}")
    if args.work and (taken := [m for m in models if (args.work / m).exists()]):
        p.error(f"--work {args.work} already holds a run of {taken[0]}; give an empty or new folder")
    if is_dpo and args.use_dora:
        p.error("--use-dora is for --objective sft")
    if "loratune_cached" in trainers and "loratune" not in trainers:
        p.error("loratune_cached reads the reference cache that the loratune run fills: name both")
    if is_dpo:
        trainers = [t for t in known if t in trainers]  # each repetition's fresh-cache run before its cached one

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    auto = "bf16" if choose_dtype("auto", torch.device(device)) == torch.bfloat16 else "fp32"
    precision = args.precision or ("fp32" if is_dpo else auto)
    reps = args.reps or (1 if args.quick else 3)
    full = set(models) == set(FULL) and set(trainers) == set(known)
    name = "quick" if args.quick else "latest" if full else "partial"
    prefix = "dpo-" if is_dpo else "dora-" if args.use_dora else ""
    out = args.out or ROOT / "bench" / "results" / (prefix + name)
    host = machine(device)  # first: its reading of how busy the CPU is must not include our own work
    peaks = {}
    if not is_dpo:  # for MFU, which the DPO report leaves out
        print(f"measuring the {device} matrix-product peak ...", flush=True)
        peaks = {name: matmul_peak(DTYPES[name], device) for name in ("fp32", "bf16")}
    report = {
        "machine": host,
        "objective": args.objective,
        "device": device,
        "precision": precision,
        "reps": reps,
        "quick": args.quick,
        "peak_flops": peaks,
        "hyperparameters": dpo.DPO_HYPER if is_dpo else HYPER | {"use_dora": args.use_dora},
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="loratune-bench-") as tmp:
        work = args.work or Path(tmp)
        for name in models:
            report["models"][name] = _bench(name, args, trainers, reps, device, precision, peaks, work / name)

    text = (render_dpo if is_dpo else render)(report)
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    print(f"written to {out.with_suffix('.md')} and .json")


def _bench(name: str, args, trainers: list[str], reps: int, device: str, precision: str, peaks: dict, folder: Path):
    """One model's runs of the workload, summarized, with its setting, workload and every run's result."""
    is_dpo = args.objective == "dpo"
    settings = (dpo.QUICK if args.quick else dpo.FULL) if is_dpo else QUICK if args.quick else FULL
    setting = settings[name]
    if args.steps:
        setting = Setting(args.steps, setting.batch_size, setting.grad_accum)
    folder.mkdir(parents=True)
    model_path = str(make_tiny_model(folder / "model", **TINY)) if name == "tiny" else resolve_model(name)
    label = _label(name, model_path)
    try:
        if is_dpo:
            runs = dpo.bench_dpo(model_path, label, setting, trainers, reps, device, precision, folder / "runs")
            summary = dpo.summarize_dpo(runs)
        else:
            runs = bench_model(
                model_path, label, setting, trainers, reps, device, precision, folder / "runs",
                use_dora=args.use_dora,
            )  # fmt: skip
            summary = summarize(runs, peaks, precision)
    except WorkerFailed as e:
        raise SystemExit(str(e)) from None
    return summary | {"setting": asdict(setting)} | runs["workload"] | {"runs": runs["results"]}


def _label(name: str, model_path: str) -> str:
    if name == "tiny":
        return (
            f"tiny random Llama (hidden {TINY['hidden_size']}, {TINY['layers']} layers, {TINY['heads']} heads, "
            f"vocab {TINY['vocab_size']})"
        )
    return f"{name} ({Path(model_path).name})"


if __name__ == "__main__":
    main()
