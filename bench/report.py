"""Medians, ratios, fairness checks and the issue's targets, rendered as one markdown report."""

from __future__ import annotations

import os
import subprocess
import time
from importlib import metadata
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parent.parent  # the repository

TRAINERS = {
    "hf": "(a) HF Trainer + PEFT, dynamic padding",
    "trl": "(b) TRL SFTTrainer + PEFT, padding-free",
    "loratune": "(c) loratune",
}
# Issue 5's targets, stated for a 2-core CPU: (model, trainer compared with, minimum throughput ratio).
SPEED_TARGETS = [("tiny", "hf", 4.0), ("tiny", "trl", 3.0), ("smollm2-135m", "hf", 2.5)]
LOSS_TOLERANCE = 0.02


def summarize(runs: dict, peaks: dict, precision: str, skip_steps: int = 0) -> dict:
    """Per trainer: medians over repetitions, and ratios to (a) when (a) ran. With `skip_steps`, throughput and MFU
    leave out the first steps (a GPU's warm-up: kernel selection, allocator growth), the same steps for all."""
    workload = runs["workload"]
    flops, tokens = workload["flops"], workload["tokens"]
    if skip_steps:
        flops, tokens = sum(workload["step_flops"][skip_steps:]), sum(workload["step_tokens"][skip_steps:])
    rows = {}
    for trainer, results in runs["results"].items():
        seconds = median(sum(r["step_seconds"][skip_steps:]) if skip_steps else r["seconds"] for r in results)
        rows[trainer] = {
            "tokens_per_s": tokens / seconds,
            "seconds": seconds,
            "padding": 1 - results[0]["tokens"] / results[0]["processed_tokens"],
            "peak_mib": median(r.get("peak_cuda_mib", r["peak_rss_mib"]) for r in results),
            "first_loss": median(r["losses"][0] for r in results),
            "final_loss": median(r["losses"][-1] for r in results),
            "mfu": {name: flops / seconds / peak for name, peak in peaks.items()},
            "attention": results[0]["attention"],
        }
        rows[trainer] |= {k: results[0][k] for k in ("plan_mib", "plan_tensors_mib", "plan_error") if k in results[0]}
    if "hf" in rows:
        for row in rows.values():
            row["speedup"] = row["tokens_per_s"] / rows["hf"]["tokens_per_s"]
            row["loss_change"] = row["final_loss"] / rows["hf"]["final_loss"] - 1
    return {"trainers": rows, "checks": _checks(runs, precision), "skip_steps": skip_steps}


def _checks(runs: dict, precision: str) -> dict:
    """What makes the comparison fair, verified on the runs themselves."""
    results = [r for rs in runs["results"].values() for r in rs]
    if not results:
        return {}
    lrs = [r["lrs"] for r in results]
    firsts = [r["losses"][0] for r in results]
    spread = (max(firsts) - min(firsts)) / min(firsts)
    workload = runs["workload"]
    return {
        "same_tokens": all(r["tokens"] == workload["tokens"] and r["targets"] == workload["targets"] for r in results),
        "same_lrs": all(
            len(x) == len(lrs[0]) and all(abs(a - b) <= 1e-9 + 1e-6 * abs(b) for a, b in zip(x, lrs[0])) for x in lrs
        ),
        "first_loss_spread": spread,
        # fp32 agrees to rounding; bf16 bases differ by kernel (padded, packed, flash) at the percent level
        "same_first_loss": spread <= (1e-4 if precision == "fp32" else 1e-2),
    }


def targets(report: dict) -> list[tuple[str, bool]]:
    out = []
    models = report["models"]
    for model, other, minimum in SPEED_TARGETS:
        rows = models.get(model, {}).get("trainers", {})
        if "loratune" in rows and other in rows:
            ratio = rows["loratune"]["tokens_per_s"] / rows[other]["tokens_per_s"]
            out.append(
                (
                    f"{model}: loratune >= {minimum:g}x {TRAINERS[other][:3]} real tokens/s: {ratio:.2f}x",
                    ratio >= minimum,
                )
            )
    for model, summary in models.items():
        rows = summary["trainers"]
        if "loratune" in rows and "hf" in rows:
            change = rows["loratune"]["loss_change"]
            out.append(
                (
                    f"{model}: final loss within {LOSS_TOLERANCE:.0%} of (a): {change:+.2%}",
                    abs(change) <= LOSS_TOLERANCE,
                )
            )
            mine, theirs = rows["loratune"]["peak_mib"], rows["hf"]["peak_mib"]
            out.append((f"{model}: peak memory no higher than (a): {mine:.0f} vs {theirs:.0f} MiB", mine <= theirs))
    return out


def render(report: dict) -> str:
    m, peaks = report["machine"], report["peak_flops"]
    h = report["hyperparameters"]
    kind = "DoRA (PEFT's DoRA layer in every trainer)" if h.get("use_dora") else "LoRA"
    memory = "peak CUDA allocated (MiB)" if report["device"] == "cuda" else "peak RSS (MiB)"
    lines = [
        "## Benchmark: LoRA fine-tuning, same workload, three trainers",
        "",
        machine_line(m),
        f"Device {report['device']}, frozen base in {report['precision']} for every trainer. Matrix-product peak "
        f"measured here: fp32 {peaks['fp32'] / 1e9:,.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:,.0f} GFLOP/s"
        + (
            " (bf16 is the slower format here, so MFU over its peak can pass 100%; the fp32 column is the distance "
            "to this machine's limit)"
            if peaks["bf16"] < peaks["fp32"]
            else ""
        )
        + ". "
        f"Medians of {report['reps']} repetition{'s' * (report['reps'] > 1)}"
        + (" (--quick: a check of the harness, not a measurement)" if report["quick"] else "")
        + ".",
        f"Every trainer: {kind} r={h['lora_r']}, alpha={h['lora_alpha']}, dropout={h['lora_dropout']} on all linear "
        f"layers of the blocks; AdamW lr={h['learning_rate']:g}, weight decay 0, warmup {h['warmup_ratio']:g} then "
        "cosine, gradient clipping 1.0; the same examples in every optimizer step; loss on answer tokens only.",
    ]
    lines += busy_warning(m)
    for summary in report["models"].values():
        lines += ["", *model_section(summary, memory)]
    checked = targets(report)
    if checked:
        lines += ["", "Issue 5 targets (stated for a 2-core CPU):", ""]
        lines += [f"- {'met' if ok else 'MISSED'}: {text}" for text, ok in checked]
    return "\n".join(lines) + "\n"


def machine_line(m: dict) -> str:
    return (
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']:.0f} GiB RAM"
        + (f", GPU {m['gpu']}" if m.get("gpu") else "")
        + f"; {m['versions']}; loratune {m['commit']}; {m['date']}"
        + (f"; load average {m['load_1min']:.2f} (1 min) at the start" if "load_1min" in m else "")
        + "."
    )


def busy_warning(m: dict) -> list[str]:
    if m["busy_share"] < 0.2:
        return []
    # timings taken while other processes compete for the cores mean little
    return [
        f"Warning: other processes used {m['busy_share']:.0%} of the CPU when the benchmark started, so "
        "these timings are not a measurement of the trainers alone."
    ]


def model_section(summary: dict, memory: str) -> list[str]:
    """One model's table (a row per trainer) and the fairness checks, as markdown lines."""
    s, rows, checks = summary["setting"], summary["trainers"], summary["checks"]
    lines = [
        f"### {summary['label']}",
        "",
        f"{s['steps']} optimizer steps x {s['batch_size'] * s['grad_accum']} examples (batch_size {s['batch_size']}"
        f" x gradient_accumulation_steps {s['grad_accum']}) = {summary['examples']} examples, "
        f"{summary['tokens']:,} real tokens ({summary['targets']:,} answer tokens carry loss); example length "
        f"median {summary['length_median']}, p90 {summary['length_p90']}, max {summary['length_max']} tokens. "
        f"Model FLOPs {summary['flops'] / summary['tokens'] / 1e6:,.1f} M per real token."
        + (
            f" Throughput and MFU count steps {k + 1}-{s['steps']}: {_steps(k)} warm the device up."
            if (k := summary.get("skip_steps"))
            else ""
        ),
        "",
        f"| trainer | real tokens/s | vs (a) | padding | {memory} | loss step 1 | final loss | vs (a) "
        "| MFU (fp32 peak) | MFU (bf16 peak) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for trainer, row in rows.items():
        lines.append(
            f"| {TRAINERS[trainer]} | {row['tokens_per_s']:,.0f} | {_ratio(row.get('speedup'))} | "
            f"{row['padding']:.0%} | {row['peak_mib']:,.0f} | {row['first_loss']:.4f} | {row['final_loss']:.4f} | "
            f"{_change(row.get('loss_change'))} | {row['mfu']['fp32']:.1%} | {row['mfu']['bf16']:.1%} |"
        )
    lines += [
        "",
        f"Checks: every run trained on exactly these {summary['tokens']:,} tokens with loss on the same "
        f"{summary['targets']:,}: {yes_no(checks['same_tokens'])}; same learning rate at every step: "
        f"{yes_no(checks['same_lrs'])}; same step-1 loss (same weights, same examples, LoRA B = 0): "
        f"{yes_no(checks['same_first_loss'])} (relative spread {checks['first_loss_spread']:.1e}). Attention: "
        + ", ".join(f"{TRAINERS[t][:3]} {r['attention']}" for t, r in rows.items())
        + ".",
    ]
    return lines


def _steps(k: int) -> str:
    return "step 1 is left out to" if k == 1 else f"steps 1-{k} are left out to"


def _ratio(x) -> str:
    return "" if x is None else f"{x:.2f}x"


def _change(x) -> str:
    return "" if x is None else f"{x:+.2%}"


def yes_no(ok: bool) -> str:
    return "yes" if ok else "NO"


def machine(device: str) -> dict:
    import torch

    from loratune.core.device import cpu_bf16_features, cpu_name

    meminfo = Path("/proc/meminfo").read_text().split() if Path("/proc/meminfo").exists() else ["", "0"]
    packages = ("torch", "transformers", "peft", "trl", "accelerate")
    return {
        "cpu": f"{cpu_name()} ({', '.join(cpu_bf16_features()) or 'no AVX2'})",
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": int(meminfo[1]) / 2**20,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "versions": ", ".join(f"{p} {_version(p)}" for p in packages),
        "commit": _commit(),
        "busy_share": _busy_share(),
        "load_1min": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%d"),
    }


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:  # e.g. TRL on a GPU machine its wheel did not reach
        return "not installed"


def _busy_share(seconds: float = 2.0) -> float:
    """Share of the machine's CPU time other processes use now, over `seconds` (Linux /proc/stat; elsewhere the
    one-minute load average per core, which also counts work that ended within the last minute)."""
    stat = Path("/proc/stat")
    if not stat.exists():
        return os.getloadavg()[0] / (os.cpu_count() or 1)

    def sample() -> tuple[int, int]:
        ticks = [int(x) for x in stat.read_text().split("\n", 1)[0].split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]  # all, idle + iowait

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


def _commit() -> str:
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "loratune"], capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "(not a git checkout)"
    return commit + (" with uncommitted changes to loratune/" if dirty else "")
