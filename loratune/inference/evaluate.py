"""`loratune eval`: a run's base and fine-tuned model side by side on a dataset."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path

from ..core.errors import UserError
from ..core.files import atomic_write
from ..data.encode import Encoder
from ..data.formats import prompt_text
from ..data.plan import StepPlan
from ..data.prepare import DataReport, encode_source, fit, read_examples
from ..memory.arithmetic import MemoryModel
from ..memory.planner import device_budget
from ..memory.shape import read_shape
from ..modeling.adapter import use_packed_attention
from ..modeling.evaluate import answer, dataset_loss, perplexity, score
from ..modeling.model import resolve_model
from ..modeling.objective import Objective, objective_for
from ..planning.resolved import ResolvedRun, resolve
from .evaluate_pairs import evaluate_pairs
from .run import LoadedRun, load_run


def evaluate_run(
    run_dir,
    data: str,
    report: str | Path | None = None,
    adapter: str = "adapter",
    generate: bool = False,
    max_new_tokens: int | None = None,
    batch_size: int | None = None,
) -> dict:
    """Token-weighted loss and perplexity of base and fine-tuned model on `data` (tokenized exactly as in training);
    with `generate`, greedy answers scored against the references. A preference run: its objective's loss and
    metrics on pairs (`evaluate_pairs`). Writes a JSONL report; returns its summary."""
    run = load_run(run_dir, adapter)
    if run.config.objective != "sft" and generate:
        raise UserError(f"--generate: {data} holds preference pairs, not prompts with one reference answer to score")
    summary = {"event": "summary", "data": str(data), "adapter": str(run.adapter)}
    objective, module, plan_of = _loss_module(run, batch_size)
    if run.config.objective != "sft":
        summary |= evaluate_pairs(run, data, objective, module, plan_of)
        rows = []
    else:
        rows = _sft(run, data, summary, (objective, module, plan_of), generate, max_new_tokens)
    report = Path(report) if report else run.run_dir / f"eval-{Path(data).stem}.jsonl"
    atomic_write(report, "".join(json.dumps(r) + "\n" for r in [summary, *rows]))
    summary["report"] = str(report)
    return summary


def _sft(run: LoadedRun, data: str, summary: dict, loss, generate: bool, max_new_tokens: int | None) -> list[dict]:
    """SFT's loss and perplexity into `summary`, and with `generate` the scored answers (returned, one per row)."""
    tokenized, fitted, n_examples, text = _tokenized(run, data)
    if generate and text:
        raise UserError(f"{data}: plain text has no prompts to answer, so --generate has nothing to score")
    models = {"base": run.model.disable_adapter, "fine_tuned": contextlib.nullcontext}
    summary |= {"examples": n_examples, "scored_examples": len(tokenized), "dropped_too_long": fitted.dropped_too_long}
    objective, module, plan_of = loss
    plan = plan_of(tokenized)
    for name, use in models.items():
        with use():
            total, count = dataset_loss(objective, module, tokenized, plan, run.tokenizer.pad_token_id, run.device)
        summary[name] = {"loss": total / count, "perplexity": perplexity(total / count)}
    summary["target_tokens"] = count  # the same for both models
    if not generate:
        return []
    return _generations(run, read_examples(data, "test", run.config), models, summary, max_new_tokens)


def _tokenized(run: LoadedRun, data: str):
    """`data` tokenized as training tokenized its data (same template and labels, same max_length and truncation),
    what fitting it to max_length did, the number of examples, and whether it is plain text (without prompts)."""
    cfg, report = run.config, DataReport()
    encoder = Encoder(run.tokenizer, run.encoder.template, cfg.train_on_inputs)
    full, _ = encode_source(data, "test", cfg, encoder, report)
    text = report.data_format == "text"
    tokenized, fitted = fit(full, cfg.max_length, cfg.truncation, split_long=text)
    if not len(tokenized):
        raise UserError(
            f"{data}: no example is left at max_length={cfg.max_length} with truncation="
            f"{cfg.truncation}, so there is no loss to measure"
        )
    return tokenized, fitted, len(full), text


def _loss_module(run: LoadedRun, batch_size: int | None) -> tuple[Objective, object, Callable[..., StepPlan]]:
    """The objective and its module as training ran them, and the passes over a data set as the run's validation
    made them (its resolved micro-batch, packing and shape buckets; `batch_size` overrides the micro-batch)."""
    cfg, objective = run.config, objective_for(run.config)
    resolved = ResolvedRun.read(run.run_dir) or _resolve_again(run)
    if resolved.packing:
        use_packed_attention(run.model.get_base_model())
    module = objective.module(run.model, shape_buckets=resolved.shape_buckets)

    def plan_of(data) -> StepPlan:
        plan = resolved.eval_plan(cfg, data)
        return plan.with_micro_batch(batch_size) if batch_size else plan

    return objective, module, plan_of


def _resolve_again(run: LoadedRun) -> ResolvedRun:
    """A run folder without a readable resolved.json (written by an older loratune): resolved as training would."""
    cfg, device = run.config, run.device
    mm = MemoryModel.for_run(cfg, read_shape(resolve_model(cfg.model), cfg), device, next(run.model.parameters()).dtype)
    return resolve(cfg, mm, device_budget(cfg, device), device=device)[0]


def _generations(run: LoadedRun, examples, models: dict, summary: dict, max_new_tokens: int | None) -> list[dict]:
    """Greedy answers of both models, scored; the scores go into `summary`, one row per example is returned."""
    outputs = {}
    for name, use in models.items():
        with use():
            outputs[name], references = answer(run.model, run.tokenizer, run.encoder, examples, max_new_tokens)
        summary[name].update(score(outputs[name], references))
    rows = []
    for i, ex in enumerate(examples):
        row = {"event": "example", "index": i, "prompt": prompt_text(ex), "reference": references[i]}
        per_model = {name: score([outputs[name][i]], [references[i]]) for name in models}
        row.update({name: outputs[name][i] for name in models})
        row.update({metric: {name: per_model[name][metric] for name in models} for metric in per_model["base"]})
        rows.append(row)
    return rows
