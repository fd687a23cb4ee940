"""The DPO workload's report: one table per model, what the cached reference saves, and the checks, as markdown."""

from __future__ import annotations

import math

from .dpo import LOSS_RTOL, TRAINERS
from .report import busy_warning, machine_line, yes_no

REFERENCE = {
    "trl_dpo": "a forward in every step",
    "trl_dpo_pre": "precomputed before training: {reference_seconds:.1f} s, counted",
    "loratune": "computed in its pair's first pass",
    "loratune_cached": "read from the cache",
}


def render_dpo(report: dict) -> str:
    m, h = report["machine"], report["hyperparameters"]
    lines = [
        "## Benchmark: DPO with LoRA, the same pairs, TRL's DPOTrainer and loratune",
        "",
        machine_line(m),
        f"Device {report['device']}, frozen base in {report['precision']} for every trainer. Medians of "
        f"{report['reps']} repetition{'s' * (report['reps'] > 1)}"
        + (" (--quick: a check of the harness, not a measurement)" if report["quick"] else "")
        + ".",
        f"Every trainer: DPO (sigmoid loss, beta {h['beta']:g}) against the base with the adapter switched off; "
        f"LoRA r={h['lora_r']}, alpha={h['lora_alpha']}, dropout {h['lora_dropout']:g} on all linear layers of the "
        f"blocks, the same initial weights; AdamW lr={h['learning_rate']:g}, weight decay 0, warmup "
        f"{h['warmup_ratio']:g} then cosine, gradient clipping 1.0; the same pairs in every optimizer step, "
        f"max_length {h['max_length']} (no sequence is cut).",
        *busy_warning(m),
    ]
    for summary in report["models"].values():
        lines += ["", *_model_section(summary, report["device"])]
    return "\n".join(lines) + "\n"


def _model_section(summary: dict, device: str) -> list[str]:
    s, rows = summary["setting"], summary["trainers"]
    memory = "peak CUDA allocated (MiB)" if device == "cuda" else "peak RSS (MiB)"
    lines = [
        f"### {summary['label']}",
        "",
        f"{s['steps']} optimizer steps x {s['batch_size'] * s['grad_accum']} pairs (batch_size {s['batch_size']} "
        f"pairs, {2 * s['batch_size']} sequences, per pass x gradient_accumulation_steps {s['grad_accum']}) = "
        f"{summary['pairs']} pairs, {summary['tokens']:,} real tokens: each pair's two sequences, prompt + chosen "
        f"and prompt + rejected, without padding ({summary['answer_tokens']:,} of them answer tokens); "
        f"{summary['length_median']} per pair (median), {summary['length_max']} at most.",
        "",
        f"| trainer | pairs/s | real tokens/s | vs (b) | padding | {memory} | reference log-probabilities "
        "| loss step 1 | final loss |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for trainer, row in rows.items():
        speedup = f"{row['speedup']:.2f}x" if "speedup" in row else ""
        lines.append(
            f"| {TRAINERS[trainer]} | {row['pairs_per_s']:.2f} | {row['tokens_per_s']:,.0f} | {speedup} | "
            f"{row['padding']:.0%} | {row['peak_mib']:,.0f} | {REFERENCE[trainer].format(**row)} | "
            f"{row['first_loss']:.4f} | {row['final_loss']:.4f} |"
        )
    return lines + ["", *_saving(rows), "", _checks_line(summary)]


def _saving(rows: dict) -> list[str]:
    """What computing the reference once saves: loratune's run on a fresh cache against the same run on the cache
    it filled, and TRL's reference in every step against its precomputed one."""
    out = []
    if {"loratune", "loratune_cached"} <= rows.keys():
        fresh, cached = rows["loratune"]["seconds"], rows["loratune_cached"]["seconds"]
        out.append(
            f"The cached reference: loratune's run took {fresh:.1f} s with a fresh cache and {cached:.1f} s on the "
            f"cache it filled; the reference forward is {1 - cached / fresh:.0%} of a first epoch's time, which every "
            "later epoch and every repeated run on the same pairs and base (another learning rate, a resumed run) "
            "does not spend."
        )
    if {"trl_dpo", "trl_dpo_pre"} <= rows.keys():
        every, pre = rows["trl_dpo"]["seconds"], rows["trl_dpo_pre"]
        out.append(
            f"TRL: {every:.1f} s with the reference in every step, {pre['seconds']:.1f} s precomputed "
            f"({pre['reference_seconds']:.1f} s of it before training); it computes the reference again in every "
            "epoch by default, and in every run either way."
        )
    return out


def _checks_line(summary: dict) -> str:
    c = summary["checks"]
    return (
        f"Checks: every run trained exactly these {summary['pairs']} pairs and {summary['tokens']:,} tokens: "
        f"{yes_no(c['same_tokens'])}; the same learning rate at every step: {yes_no(c['same_lrs'])}; step-1 loss "
        f"ln 2 = {math.log(2):.4f} in every run (the adapter's B = 0, so the policy is its reference): "
        f"{yes_no(c['first_loss_is_log2'] <= 1e-5)} (largest relative difference {c['first_loss_is_log2']:.1e}); "
        f"every step's loss the same in every run (same initial adapter, pairs and steps): "
        f"{yes_no(c['same_steps'] and c['step_loss_spread'] <= LOSS_RTOL)} (largest relative difference "
        f"{c['step_loss_spread']:.1e}); the fresh-cache runs computed the reference and the cached runs none: "
        f"{yes_no(c['fresh_computed_all'] and c['cached_computed_none'])}."
    )
