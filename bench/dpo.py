"""The DPO workload of `python -m bench --objective dpo`: TRL's DPOTrainer + PEFT and loratune on the same pairs.

Four runs per repetition, each in its own process: TRL computing the reference log-probabilities in every step (its
default) and once before training (`precompute_ref_log_probs`), loratune with a fresh reference cache (it computes
each pair's reference in the first pass that holds it, as in any first epoch) and loratune again on the cache that
run filled (a repeated run, and what every epoch after the first costs). See bench/README.md.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import median

import numpy as np

from loratune.data.plan import StepPlan
from loratune.modeling.model import load_tokenizer

from .speed import HYPER, Setting, repeat
from .workload import make_pairs

TRAINERS = {
    "trl_dpo": "(b) TRL DPOTrainer + PEFT",
    "trl_dpo_pre": "(b') TRL DPOTrainer + PEFT, precomputed reference",
    "loratune": "(c) loratune, fresh reference cache",
    "loratune_cached": "(c') loratune, reference from its cache",
}
# 8 sequences per pass as in the SFT workload: 4 pairs of two. The Training Guide's other settings; no dropout,
# which TRL's DPO turns off (`disable_dropout`) so that the policy with a zero adapter is exactly its reference.
FULL = {
    "tiny": Setting(steps=8, batch_size=4, grad_accum=8),
    "smollm2-135m": Setting(steps=2, batch_size=4, grad_accum=4),
}
QUICK = {
    "tiny": Setting(steps=2, batch_size=2, grad_accum=2),
    "smollm2-135m": Setting(steps=1, batch_size=2, grad_accum=2),
}
DPO_HYPER = HYPER | {"lora_dropout": 0.0, "beta": 0.1}
LOSS_RTOL = 1e-3  # the same adapter, pairs and steps in fp32: every step's loss agrees to rounding


def bench_dpo(
    model_path: str, label: str, setting: Setting, trainers: list[str], reps: int, device: str, precision: str,
    work: Path,
) -> dict:  # fmt: skip
    """Every trainer `reps` times (interleaved) on the same pairs; a failed run raises WorkerFailed."""
    work.mkdir(parents=True)
    n = setting.steps * setting.batch_size * setting.grad_accum  # exactly one epoch of whole steps
    pairs = make_pairs(load_tokenizer(model_path), n, DPO_HYPER["seed"])
    lengths, targets = pairs.lengths, pairs.targets
    if pairs.longest_sequence > DPO_HYPER["max_length"]:
        raise SystemExit(f"a pair's sequence has {pairs.longest_sequence} tokens, more than max_length")
    # loratune shuffles the pairs itself; TRL reads them in the order it will use.
    steps = StepPlan(lengths, targets, n // setting.steps, setting.batch_size, seed=DPO_HYPER["seed"]).epoch(0)
    order = np.concatenate(steps).tolist()
    columns = {"prompt_ids": pairs.prompt_ids, "chosen_ids": pairs.chosen_ids, "rejected_ids": pairs.rejected_ids}
    tokens = work / "tokens.json"
    tokens.write_text(json.dumps({name: [column[i] for i in order] for name, column in columns.items()}))
    base = dict(
        model_path=model_path, data=str(pairs.write_jsonl(work / "pairs.jsonl")), tokens=str(tokens), device=device,
        precision=precision, steps=setting.steps, batch_size=setting.batch_size, grad_accum=setting.grad_accum,
        use_dora=False, objective="dpo", **DPO_HYPER,
    )  # fmt: skip
    stats = {
        "label": label,
        "pairs": n,
        "tokens": int(lengths.sum()),
        "answer_tokens": int(targets.sum()),
        "length_median": int(np.median(lengths)),
        "length_max": int(lengths.max()),
    }
    print(
        f"\n{label}: {n} pairs, {stats['tokens']:,} tokens in their two sequences ({stats['answer_tokens']:,} answer "
        f"tokens), per pair median {stats['length_median']}, max {stats['length_max']}",
        flush=True,
    )

    def cache(trainer: str, rep: int) -> dict:
        # a repetition's cached run reads the reference cache its fresh run filled
        return {"cache": str(work / f"cache-{rep}")} if trainer.startswith("loratune") else {}

    results, _ = repeat(base, trainers, TRAINERS, reps, work, extra=cache)
    return {"results": results, "workload": stats}


def summarize_dpo(runs: dict) -> dict:
    """Per trainer: medians over repetitions, ratios to TRL's default, and the checks of a fair comparison."""
    workload, results = runs["workload"], runs["results"]
    rows = {}
    for trainer, rs in results.items():
        seconds = median(r["seconds"] for r in rs)
        rows[trainer] = {
            "pairs_per_s": workload["pairs"] / seconds,
            "tokens_per_s": workload["tokens"] / seconds,
            "seconds": seconds,
            "padding": 1 - rs[0]["tokens"] / rs[0]["processed_tokens"],
            "peak_mib": median(r.get("peak_cuda_mib", r["peak_rss_mib"]) for r in rs),
            "first_loss": median(r["losses"][0] for r in rs),
            "final_loss": median(r["losses"][-1] for r in rs),
            "reference_seconds": median(r.get("reference_seconds", 0.0) for r in rs),
        }
    if "trl_dpo" in rows:
        for row in rows.values():
            row["speedup"] = row["tokens_per_s"] / rows["trl_dpo"]["tokens_per_s"]
    return {"trainers": rows, "checks": _checks(runs)}


def _checks(runs: dict) -> dict:
    results = [r for rs in runs["results"].values() for r in rs]
    workload = runs["workload"]
    lrs, losses = [r["lrs"] for r in results], [r["losses"] for r in results]
    return {
        "same_tokens": all(r["tokens"] == workload["tokens"] and r["pairs"] == workload["pairs"] for r in results),
        "same_lrs": all(np.allclose(x, lrs[0], rtol=1e-6, atol=1e-9) for x in lrs),
        "first_loss_is_log2": max(abs(x[0] / math.log(2) - 1) for x in losses),
        "step_loss_spread": max(abs(a / b - 1) for x in losses for a, b in zip(x, losses[0])),
        "same_steps": all(len(x) == len(losses[0]) for x in losses),
        "cached_computed_none": all(r["reference_written"] == 0 for r in runs["results"].get("loratune_cached", [])),
        "fresh_computed_all": all(r["reference_written"] > 0 for r in runs["results"].get("loratune", [])),
    }
