"""The GPU benchmark's report (`python -m bench.gpu`) as markdown: speed, memory, CUDA-only paths, issue 24's
targets, each target met or missed with its number."""

from __future__ import annotations

from .report import TRAINERS, model_section

# Issue 24's targets, stated for one H100.
SPEED_TARGETS = [("hf", 2.0), ("trl", 1.3)]  # loratune's real tokens/s at least this many times theirs
LOSS_TOLERANCE = 0.01  # final loss within 1% of HF's
MFU_TARGET = ("llama-3.2-1b", 0.40)  # of the measured bf16 matrix-product peak
MEMORY_TOLERANCE = 0.10  # estimate within 10% of max_memory_allocated
STATUS = {"ok": "ok", "failed": "FAILED", "skipped": "skipped"}


def render(report: dict) -> str:
    lines = _header(report)
    lines += ["", "## Speed: same examples, LoRA and steps for every trainer", ""]
    memory = "peak CUDA allocated (MiB)" if report["device"] == "cuda" else "peak RSS (MiB)"
    for entry in report["speed"].values():
        if "trainers" in entry:
            lines += [*model_section(entry, memory), ""]
        else:
            lines += [f"### {entry['label']}", "", "No trainer finished.", ""]
        lines += [f"- {TRAINERS[t]}: not run: {why}" for t, why in entry["not_run"].items()]
        lines += [f"- {TRAINERS[t]}: FAILED: {_first_and_last(error)}" for t, error in entry["failed"].items()]
    if not report["speed"]:
        lines.append("Not run.")
    lines += ["", *_memory(report), "", *_checks(report), "", *_targets(report)]
    if report["failures"]:
        lines += ["", "## Parts that failed", ""]
        lines += [f"- {part}: {error}" for part, error in report["failures"].items()]
    return "\n".join(lines) + "\n"


def _first_and_last(error: str) -> str:
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    return lines[0] if len(lines) < 2 else f"{lines[0]} ... {lines[-1]}"


def _header(report: dict) -> list[str]:
    m, peaks = report["machine"], report["peak_flops"]
    lines = ["# loratune on a GPU: speed, memory and the CUDA-only paths", ""]
    if report["tiny"]:
        lines += [
            f"**Run on the {report['device']} at tiny sizes: a check of the harness, not a measurement.** The "
            "targets below are for an H100.",
            "",
        ]
    optional = ", ".join(f"{k} {v or 'not installed'}" for k, v in report["packages"].items())
    lines.append(
        f"Machine: {m['gpu'] or m['cpu']}"
        + (f" (CPU {m['cpu']}, {m['cores']} cores)" if m["gpu"] else "")
        + f"; {m['versions']}; {optional}; loratune {m['commit']}; {m['date']}."
    )
    if peaks:
        lines.append(
            f"Matrix-product peak measured here: bf16 {_flops(peaks['bf16'])}, fp32 {_flops(peaks['fp32'])}. Frozen "
            f"base in {report['precision']} for every trainer."
        )
    if "seconds" in report:
        lines.append(f"`{report['command']}` took {report['seconds']:.0f} s.")
    return lines


def _flops(x: float) -> str:
    return f"{x / 1e12:,.1f} TFLOP/s" if x >= 1e12 else f"{x / 1e9:,.0f} GFLOP/s"


def _memory(report: dict) -> list[str]:
    lines = ["## Memory: `loratune plan`'s estimate against measurement", ""]
    cases = report["memory"].get("cases")
    if cases is None:
        return [*lines, "Not run."]
    measured = "torch.cuda.max_memory_allocated" if report["device"] == "cuda" else "the CPU allocator's total"
    lines += [
        f"One training pass (`bench/gpu_memory.py`): the peak increase of {measured} during a forward and "
        "backward pass, against `MemoryModel.batch_bytes` of the same pass.",
        "",
        "| case | tokens | base | measured MiB | estimated MiB | estimated / measured |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for c in cases:
        if c["status"] == "ok":
            lines.append(
                f"| {c['case']} | {c['tokens']:,} | {c['base']} | {c['measured'] / 2**20:,.1f} | "
                f"{c['estimated'] / 2**20:,.1f} | {c['ratio']:.3f} |"
            )
        else:
            lines.append(f"| {c['case']} | FAILED: {c['detail']} | | | | |")
    if stopped := report["memory"].get("stopped"):
        lines += ["", f"The memory cases stopped early: {stopped}"]
    whole = _whole_runs(report)
    if whole:
        lines += [
            "",
            "Whole training run (loratune's speed runs above): `loratune plan`'s peak without its framework "
            "overhead item against the run's max_memory_allocated (the plan's total, overhead included, in brackets).",
            "",
            "| shape | measured MiB | plan MiB (with overhead) | plan / measured |",
            "| --- | ---: | ---: | ---: |",
        ]
        for shape, row in whole.items():
            lines.append(
                f"| {shape} | {row['peak_mib']:,.0f} | {row['plan_tensors_mib']:,.0f} ({row['plan_mib']:,.0f}) | "
                f"{row['plan_tensors_mib'] / row['peak_mib']:.3f} |"
            )
    return lines


def _whole_runs(report: dict) -> dict:
    """loratune's speed runs with their plan estimate, on CUDA (a CPU's peak RSS counts the libraries too)."""
    out = {}
    if report["device"] != "cuda":
        return out
    for shape, entry in report["speed"].items():
        row = entry.get("trainers", {}).get("loratune")
        if row and "plan_tensors_mib" in row:
            out[shape] = row
    return out


def _checks(report: dict) -> list[str]:
    lines = ["## CUDA-only paths", ""]
    if not report["checks"]:
        return [*lines, "Not run."]
    lines += ["| check | result | seconds | detail |", "| --- | --- | ---: | --- |"]
    for name, c in report["checks"].items():
        seconds = f"{c['seconds']:.0f}" if "seconds" in c else ""
        lines.append(f"| {name} | {STATUS[c['status']]} | {seconds} | {c['detail']} |")
    return lines


def targets(report: dict) -> list[tuple[str, bool | None]]:
    """Issue 24's targets for what this run covered: (what, with its number; met, or None when not measured)."""
    out = []
    for shape, entry in report["speed"].items():
        rows = entry.get("trainers", {})
        mine = rows.get("loratune")
        for other, minimum in SPEED_TARGETS:
            text = f"{shape}: loratune >= {minimum:g}x {TRAINERS[other][:3]} real tokens/s"
            if mine and other in rows:
                ratio = mine["tokens_per_s"] / rows[other]["tokens_per_s"]
                out.append((f"{text}: {ratio:.2f}x", ratio >= minimum))
            else:
                out.append((text, None))
        text = f"{shape}: final loss within 1% of (a)"
        if mine and "loss_change" in mine:
            out.append((f"{text}: {mine['loss_change']:+.2%}", abs(mine["loss_change"]) <= LOSS_TOLERANCE))
        else:
            out.append((text, None))
    shape, minimum = MFU_TARGET
    if shape in report["speed"]:
        mine = report["speed"][shape].get("trainers", {}).get("loratune")
        text = f"{shape}: loratune MFU >= {minimum:.0%} of the bf16 peak"
        out.append((f"{text}: {mine['mfu']['bf16']:.1%}", mine["mfu"]["bf16"] >= minimum) if mine else (text, None))
    ratios = [(c["case"], c["ratio"]) for c in report["memory"].get("cases", []) if c["status"] == "ok"]
    ratios += [(f"{s}, whole run", r["plan_tensors_mib"] / r["peak_mib"]) for s, r in _whole_runs(report).items()]
    if ratios:
        case, worst = max(ratios, key=lambda x: abs(x[1] - 1))
        text = f"memory estimate within 10% in every case ({len(ratios)}): worst {worst:.3f} ({case})"
        out.append((text, abs(worst - 1) <= MEMORY_TOLERANCE))
    return out


def _targets(report: dict) -> list[str]:
    found = targets(report)
    if not found:
        return ["## Issue 24 targets (one H100)", "", "None measured."]
    verdict = {True: "met", False: "MISSED", None: "NOT MEASURED"}
    return ["## Issue 24 targets (one H100)", ""] + [f"- {verdict[ok]}: {text}" for text, ok in found]
