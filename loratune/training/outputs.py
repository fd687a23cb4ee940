"""What a run leaves behind: adapters, held-out test scores, summary.json and the report."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from ..core.config import BASE_CHANGING_INITS
from ..core.errors import UserError
from ..core.files import atomic_dir, atomic_write, copy_dir
from ..data.formats import prompt_text
from ..memory.planner import GENERATION_BATCH
from ..modeling.evaluate import score
from ..modeling.generate import generate_texts
from ..modeling.variants import as_plain_lora, write_plain_lora_config
from .session import Session


def save_adapter(path: Path, engine, model, tokenizer, template: str) -> None:
    """The adapter in PEFT's format, with the tokenizer and chat template it was trained with; never a NaN one.
    Every process calls it (sharded weights are gathered); the main process writes."""
    weights = engine.adapter_state(model)
    for name, value in weights.items():
        if not torch.isfinite(value).all():
            raise UserError(f"the adapter has non-finite weights ({name}); refusing to save it", exit_code=1)
    if not engine.accelerator.is_main_process:
        return
    weights, converted = as_plain_lora(model, weights)
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, state_dict=weights)
        if converted:
            write_plain_lora_config(tmp)
        tokenizer.chat_template = template
        tokenizer.save_pretrained(tmp)


def phase(s: Session, key: str, text: str, **count) -> None:
    """What the run does now, on the progress line and in metrics.jsonl for the UI (main process)."""
    s.metrics.phase(key, text, **count)
    s.progress.phase(key, text, **count)


def base_test_scores(s: Session) -> dict:
    """The base model's held-out scores: answered once, before the first step; a resumed run reads them back from
    its first segment's metrics."""
    earlier = s.metrics.earlier("test")
    if earlier is not None:
        return {k: v for k, v in earlier.items() if k not in ("event", "step", "model", "time")}
    # pissa/olora: before the first step, the base as changed plus the initial adapter is the base (adapter off: not)
    changes_base = s.cfg.lora_init in BASE_CHANGING_INITS
    with contextlib.nullcontext() if changes_base else s.model.disable_adapter():
        scores = test_scores(s, "base model")
    s.metrics.write(event="test", step=s.state.step, model="base model", **scores)
    return scores


def test_scores(s: Session, label: str, before: dict | None = None) -> dict:
    """Greedy answers to the held-out test prompts, scored against their references."""
    examples = s.data.test
    with torch.compiler.set_stance("force_eager"):  # decoding one token at a time would recompile compiled layers
        predictions, references = answers(s, examples, f"answering the held-out test, {label}")
    scores = score(predictions, references)
    shown = ", ".join(f"{k.replace('_', ' ')} {v:.1%}" for k, v in scores.items())
    s.progress.note(f"held-out test ({len(examples)} examples), {label}: {shown}")
    if before is not None:
        _show_samples(s, before["samples"], predictions)
    return {**scores, "samples": predictions[:2]}


def answers(s: Session, examples, text: str) -> tuple[list[str], list[str]]:
    """`modeling.evaluate.answer`'s greedy answers and references, a generation batch at a time so that the run
    says how many are done: the same batches (shortest prompts first) and one length budget, so the same answers."""
    prompts = [s.encoder.prompt_ids(ex) for ex in examples]
    references = [s.encoder.reference(ex) for ex in examples]
    budget = max(len(s.tokenizer(r, add_special_tokens=False).input_ids) for r in references) + 16
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    predictions = [""] * len(prompts)
    for start in range(0, len(order), GENERATION_BATCH):
        phase(s, "test", text, done=start, total=len(order))
        batch = order[start : start + GENERATION_BATCH]
        texts = generate_texts(s.model, s.tokenizer, [prompts[i] for i in batch], s.encoder.end_ids, budget)
        for i, answer in zip(batch, texts):
            predictions[i] = answer
    phase(s, "test", text, done=len(order), total=len(order))
    return predictions, references


def _show_samples(s: Session, before: list[str], after: list[str]) -> None:
    from rich.table import Table

    table = Table(title="sample generations (held-out)", show_lines=True)
    for column in ("prompt", "base model", "fine-tuned"):
        table.add_column(column, overflow="fold")
    for ex, b, a in zip(s.data.test[:2], before, after):
        table.add_row(prompt_text(ex), b, a)
    if s.console.enabled:
        s.console.out.print(table)


def finish(s: Session) -> dict:
    """The last adapter (and the best, when there was nothing to choose by), the test scores after training,
    summary.json and the report. Returns the summary."""
    state = s.state
    limited = s.cfg.max_steps and state.step >= s.cfg.max_steps
    state.stop_reason = state.stop_reason or ("max_steps reached" if limited else "all epochs done")
    state.elapsed = s.elapsed()
    plots = s.training.plots
    if plots:  # drawn by the helper while this process saves
        from .report import best_evaluation, read_records

        train, evals = read_records(s.run)
        plots.draw(s.run, train, evals, best_evaluation({"best_step": state.best_step}, evals))
    phase(s, "save", "saving the adapter")
    s.objective.keep(s.data)
    save_last(s)
    s.engine.accelerator.wait_for_everyone()
    test_after = test_scores(s, "fine-tuned", before=s.training.test_before) if s.scores_test else None
    summary = _summary(s, test_after)
    s.trackers.finish(summary)
    if s.main:
        atomic_write(s.run / "summary.json", json.dumps(summary, indent=1))
        from .report import write_report

        write_report(s.run, drawn=plots.drawn if plots else None)
        best = (
            ""  # no validation set (or none of it fit max_length)
            if state.best_val_loss is None
            else f". Best validation loss {state.best_val_loss:.4f} at step {state.best_step}"
        )
        from ..core.console import format_seconds

        s.console.info(
            f"done in {format_seconds(state.elapsed)}: {state.stop_reason}{best}; adapter in {s.run / 'adapter'}; "
            f"report in {s.run / 'report.md'}"
        )
    return summary


def save_last(s: Session) -> None:
    """The last adapter in last/, and in adapter/ too when there is no validation to choose the best by. When
    adapter/ already holds this adapter (the best is the last step's), last/ is a copy of it: the same files, without
    gathering, checking and writing the weights and tokenizer again."""
    validated = len(s.data.val) > 0
    if validated and s.state.best_step == s.state.step:  # the same on every process: none gathers weights
        if s.main:
            copy_dir(s.run / "adapter", s.run / "last")
        return
    save_adapter(s.run / "last", s.engine, s.model, s.tokenizer, s.encoder.template)
    if not validated and s.main:  # nothing to choose by: the best adapter is the last one
        copy_dir(s.run / "last", s.run / "adapter")


def _summary(s: Session, test_after: dict | None) -> dict:
    from ..core.device import peak_memory

    state, r = s.state, s.resolved
    return {
        "steps": state.step,
        "epochs": round(state.epoch + state.step_in_epoch / max(1, r.steps_per_epoch), 4),
        "stop_reason": state.stop_reason,
        "best_step": state.best_step,
        "best_epoch": state.best_epoch,
        "best_val_loss": state.best_val_loss,
        "last_val_loss": state.history[-1]["val_loss"] if state.history else None,
        "train_seconds": round(state.elapsed, 2),
        "tokens": state.tokens,
        "unit": s.objective.unit,  # what the loss is a mean over, counted under its key (`target_tokens` for SFT)
        s.objective.unit_key: state.target_tokens,
        "tokens_per_s": round(state.tokens / max(state.elapsed, 1e-9), 1),
        "nonfinite_steps": state.nonfinite_total,
        "trainable_parameters": sum(p.numel() for p in s.trainable),
        "precision": r.precision,
        "packing": r.packing,
        "processes": r.processes,
        "batch_size": r.batch_size,  # the micro-batch at the end: batch_size auto's choice, halved after OOM
        "gradient_accumulation_steps": r.gradient_accumulation_steps,
        "adapter": str(s.run / "adapter"),
        "test_before": s.training.test_before,
        "test_after": test_after,
    } | peak_memory(s.device)
