"""The training loop: one function, read top to bottom.

data -> model + LoRA -> optimizer + schedule -> (resume) -> for each optimizer step:
    forward/backward its passes (loss = sum over the step's target tokens / their count)
    clip, skip non-finite updates, step -> log -> evaluate / checkpoint / early-stop
-> best adapter in adapter/, last in last/, summary.json
"""

from __future__ import annotations

import json
import math
import pickle
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch

from ..core.config import TrainConfig, dump_yaml, guide_warnings, read_run_config
from ..core.console import Console, format_seconds
from ..core.device import choose_dtype, keep_freed_cpu_memory, peak_memory, resolve_device
from ..core.errors import UserError
from ..core.files import atomic_dir, atomic_write, file_digest
from ..data.batching import collate, epoch_steps, split_step, wants_shape_buckets
from ..data.encode import encoder_for
from ..data.formats import prompt_text
from ..data.prepare import Prepared, prepare
from ..memory import planner as memory
from ..modeling.attention import NAME as PACKED_ATTENTION
from ..modeling.evaluate import answer, dataset_loss, score
from ..modeling.loss import CausalLMLoss
from ..modeling.model import (
    add_lora,
    apply_liger,
    check_kernels,
    compile_layers,
    enable_checkpointing,
    generation_end_ids,
    load_model,
    load_tokenizer,
    resolve_model,
    supports_packing,
)
from . import checkpoint as ckpt
from .report import write_report
from .tracking import Trackers

# Config fields that may change when resuming: they do not affect the result.
# The split of a step into passes and processes may change too, as long as each step keeps the same examples.
RESUMABLE_CHANGES = {
    "output_dir",
    "report_to",
    "save_every_steps",
    "keep_checkpoints",
    "test_data",
    "skip_bad_rows",
    "batch_size",
    "gradient_accumulation_steps",
    "torch_compile",
    "liger_kernels",
}


class Interrupted(UserError):
    """Training stopped by a signal after saving a checkpoint; the exit code is the shell's for that signal
    (130 for SIGINT, 143 for SIGTERM), so a supervisor can tell which one stopped it."""

    def __init__(self, run: Path, signal_name: str):
        super().__init__(
            f"{signal_name}: checkpoint saved. Resume with: loratune train --resume {run}",
            exit_code=128 + signal.Signals[signal_name],
            label="stopped",
        )


def train(
    config: TrainConfig, *, resume: bool = False, overwrite: bool = False, console: Console | None = None
) -> dict:
    """Fine-tune `config.model` with LoRA on `config.train_data`; returns the run summary (also in summary.json)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    cfg = config.model_copy(deep=True)
    run = Path(cfg.output_dir or "runs/run")
    if resume and not ckpt.list_checkpoints(run) and not (run / "config.yaml").is_file():
        raise UserError(f"--resume: {run} holds no checkpoint to resume from")
    wanted = resolve_device(cfg.device)
    check_kernels(cfg, wanted)
    if wanted.type == "cpu":
        keep_freed_cpu_memory()
    dtype = choose_dtype(cfg.precision, wanted)
    accelerator = Accelerator(cpu=cfg.device == "cpu", mixed_precision="fp16" if dtype == torch.float16 else "no")
    main = accelerator.is_main_process
    console = console or Console(enabled=main)
    ckpt.check_output_dir(run, overwrite=overwrite, resume=resume)
    trackers = Trackers(cfg.report_to, enabled=main)  # a missing tracker package stops here, before any loading
    for warning in guide_warnings(cfg):
        console.warn(warning)
    set_seed(cfg.seed)

    # --- Data --------------------------------------------------------------------------------------------
    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path)
    encoder = encoder_for(tokenizer, cfg)
    with accelerator.main_process_first():  # the others then read the tokenization cache the first one wrote
        data = prepare(cfg, encoder)
    for is_warning, line in data.report.lines():
        (console.warn if is_warning else console.info)(line)

    # --- Memory: choose batch_size auto, and stop now if even the smallest micro-batch cannot fit ----------
    device = accelerator.device
    mem = memory.RunMemory(cfg, model_path, data.train.lengths, data.train.target_counts, device, dtype)
    auto_batch = cfg.batch_size == "auto"
    if auto_batch:
        choice = mem.choose_batch_size()
        cfg.batch_size, cfg.gradient_accumulation_steps = choice.batch_size, choice.gradient_accumulation_steps
        console.info(choice.reason)
    elif warning := mem.check():  # an auto choice fits by construction
        console.warn(warning)

    # --- Model -------------------------------------------------------------------------------------------
    base = load_model(model_path, dtype, device, load_in_4bit=cfg.load_in_4bit)
    encoder.end_ids |= generation_end_ids(base)
    packing = cfg.packing and supports_packing(base)
    if cfg.packing and not packing:
        console.warn(f"{type(base).__name__} does not support packed attention; using padded batches instead")
    if packing:
        base.set_attn_implementation(PACKED_ATTENTION)
    if cfg.liger_kernels and not apply_liger(base):
        console.warn(f"liger_kernels: Liger has no kernels for {base.config.model_type} models; training without them")
    if cfg.gradient_checkpointing:
        enable_checkpointing(base)
    model = add_lora(base, cfg)
    if cfg.torch_compile:
        compile_layers(base)
    buckets = packing and wants_shape_buckets(device, dtype)
    loss_module = CausalLMLoss(model, shape_buckets=buckets)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if auto_batch and device.type == "cuda":  # confirm the estimate's choice on the largest pass of real data
        cfg.batch_size, cfg.gradient_accumulation_steps = _confirm_batch_size(
            loss_module, data.train, cfg, choice.largest, mem, packing, tokenizer.pad_token_id, device, console
        )
    n_trainable, n_total = sum(p.numel() for p in trainable), sum(p.numel() for p in model.parameters())
    console.info(
        f"model {cfg.model} on {device.type} ({str(dtype).removeprefix('torch.')} base, fp32 LoRA): "
        f"{n_trainable:,} trainable of {n_total:,} parameters ({100 * n_trainable / n_total:.2f}%)"
    )

    # --- Optimizer and schedule ----------------------------------------------------------------------------
    world = accelerator.num_processes
    per_step = cfg.batch_size * cfg.gradient_accumulation_steps * world
    steps_per_epoch = math.ceil(len(data.train) / per_step)
    total_steps = (
        steps_per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    )
    warmup_steps = math.ceil(cfg.warmup_ratio * total_steps)
    optimizer = torch.optim.AdamW(
        trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=device.type == "cuda" or None
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg.lr_scheduler, warmup_steps, total_steps))
    loss_module, optimizer = accelerator.prepare(loss_module, optimizer)
    console.info(
        f"{len(data.train)} training examples, {len(data.val)} validation; effective batch {per_step} = batch_size "
        f"{cfg.batch_size} x gradient_accumulation_steps {cfg.gradient_accumulation_steps}"
        + (f" x {world} processes" if world > 1 else "")
        + f"; {total_steps} optimizer steps ({steps_per_epoch} per epoch), {warmup_steps} warmup"
        + f"; {'packed rows' if packing else 'padded batches'}"
    )

    # --- Resume, or start fresh ---------------------------------------------------------------------------
    if main:  # only now, with data and model loaded, does the run folder appear
        ckpt.create_output_dir(run, overwrite=overwrite, resume=resume)
    accelerator.wait_for_everyone()
    state, partial = ckpt.TrainState(), None
    fingerprint = _fingerprint(cfg, model_path)
    if resume:
        state, partial = _resume(run, cfg, fingerprint, model, optimizer, scheduler, console)
        _check_step_shape(state, partial, per_step, world)
    elif main:
        atomic_write(run / "config.yaml", dump_yaml(cfg))
        atomic_write(run / "data.json", json.dumps(asdict(data.report), indent=1))
        atomic_write(run / "fingerprint.json", json.dumps(fingerprint, indent=1))
        (run / "metrics.jsonl").write_text("")
    state.examples_per_step = per_step
    # The micro-batch of an interrupted step must stay the same for its passes to line up; else the config's.
    batch_size = state.micro_batch if partial is not None and state.micro_batch else cfg.batch_size
    metrics = _Metrics(run / "metrics.jsonl", state, trackers, enabled=main)
    trackers.start(run, cfg.model_dump(), state.step)
    save_best = _BestAdapter(run, model, tokenizer, encoder.template, enabled=main)

    test_before = None
    if data.test and main:
        with model.disable_adapter():
            test_before = _test_scores(model, tokenizer, encoder, data.test, console, "base model")

    # --- The loop -----------------------------------------------------------------------------------------
    stop = _StopRequest()
    progress = console.progress(total_steps, state.step)
    segment_start = time.perf_counter()
    elapsed_before = state.elapsed
    lengths, target_counts = data.train.lengths, data.train.target_counts
    longest = int(lengths.max())
    epoch_plan: tuple[int, list] = (-1, [])
    loss_module.train()
    try:
        with stop:
            while state.step < total_steps and state.stop_reason is None:
                if epoch_plan[0] != state.epoch:
                    epoch_plan = (state.epoch, epoch_steps(len(data.train), per_step, cfg.seed, state.epoch))
                steps = epoch_plan[1]
                if state.step_in_epoch >= len(steps):
                    state.epoch, state.step_in_epoch = state.epoch + 1, 0
                    continue
                examples = steps[state.step_in_epoch]
                state.micro_batch = batch_size
                passes = split_step(examples, lengths, batch_size, packing, longest, world)
                mine = passes[accelerator.process_index :: world]
                step_targets = int(target_counts[examples].sum())  # the whole step, all processes
                step_start = time.perf_counter()
                step_tokens = padded_tokens = 0

                if partial is not None:  # an interrupted step: its gradients so far were saved
                    for p, g in zip(trainable, partial):
                        p.grad = g.to(p.device)
                    partial = None

                try:
                    for i in range(state.pass_in_step, len(mine)):
                        batch = collate(data.train, mine[i], packing, tokenizer.pad_token_id, buckets).to(device)
                        mem.raise_if_over(batch)
                        sync = i == len(mine) - 1
                        with nullcontext() if sync else accelerator.no_sync(loss_module):
                            loss_sum = loss_module(batch)
                            # Divide by the step's target count (x processes, since DDP averages): the update is the
                            # mean over all the step's target tokens whatever the split into passes and processes.
                            accelerator.backward(loss_sum * (world / step_targets))
                        state.step_loss_sum += float(loss_sum.detach())
                        step_tokens += batch.n_tokens
                        padded_tokens += batch.input_ids.numel()
                        state.pass_in_step = i + 1
                        if stop.requested and not sync and world == 1:  # mid-step saves hold one process's gradients
                            _save_interrupted(
                                run, model, optimizer, scheduler, state, trainable, elapsed_before, segment_start, main
                            )
                            raise Interrupted(run, stop.signal_name)
                except torch.OutOfMemoryError:
                    out_of_memory = True
                else:
                    out_of_memory = False
                if out_of_memory:  # outside the except block, so the failed pass's tensors can be freed
                    batch = loss_sum = partial = None
                    batch_size = _halve_after_oom(batch_size, world, mem, optimizer, state, device)
                    progress.note(
                        f"step {state.step + 1}: out of memory; replaying it with batch_size {batch_size} "
                        "(smaller passes, the same effective batch)"
                    )
                    metrics.write(event="out_of_memory", step=state.step + 1, batch_size=batch_size)
                    continue

                # --- the optimizer step -------------------------------------------------------------------
                step_loss = _all_sum(accelerator, state.step_loss_sum) / step_targets
                grad_norm = _clip(accelerator, trainable, cfg.max_grad_norm)
                finite = math.isfinite(step_loss) and (math.isfinite(grad_norm) or cfg.precision == "fp16")
                if finite:
                    optimizer.step()
                    state.nonfinite_streak = 0
                else:
                    state.nonfinite_streak += 1
                    state.nonfinite_total += 1
                    progress.note(f"step {state.step + 1}: non-finite loss or gradient, update skipped")
                optimizer.zero_grad(set_to_none=True)
                lr = scheduler.get_last_lr()[0]  # the rate this update used
                scheduler.step()
                state.step += 1
                state.step_in_epoch += 1
                state.pass_in_step, state.step_loss_sum = 0, 0.0
                tokens = int(_all_sum(accelerator, step_tokens))
                state.tokens += tokens
                state.target_tokens += step_targets
                seconds = time.perf_counter() - step_start
                epoch_float = state.epoch + state.step_in_epoch / len(steps)
                padding_share = 1 - tokens / max(1, int(_all_sum(accelerator, padded_tokens)))  # all processes
                metrics.write(
                    event="train",
                    step=state.step,
                    epoch=round(epoch_float, 4),
                    loss=step_loss,
                    lr=lr,
                    grad_norm=grad_norm,
                    tokens=tokens,
                    target_tokens=step_targets,
                    tokens_per_s=tokens / seconds,
                    target_tokens_per_s=step_targets / seconds,
                    padding_share=padding_share,
                    seconds=seconds,
                )
                progress.update(state.step, epoch_float, step_loss, lr, tokens / seconds, padding_share)

                if state.nonfinite_streak >= cfg.max_nonfinite_steps:
                    raise UserError(_nonfinite_diagnosis(cfg, state, data, examples, dtype), exit_code=1)

                # --- evaluate, keep the best, stop early, checkpoint --------------------------------------
                end_of_epoch = state.step_in_epoch == len(steps)
                evaluate_now = (
                    (cfg.eval_every_steps and state.step % cfg.eval_every_steps == 0)
                    or (not cfg.eval_every_steps and end_of_epoch)
                    or state.step == total_steps
                )
                if evaluate_now and len(data.val):
                    val_loss = _val_loss(
                        loss_module, data, batch_size, packing, buckets, tokenizer, device, accelerator
                    )
                    improved = (
                        state.best_val_loss is None or val_loss < state.best_val_loss - cfg.early_stopping_min_delta
                    )
                    if improved:
                        state.best_val_loss, state.best_step, state.best_epoch = (
                            val_loss,
                            state.step,
                            round(epoch_float, 4),
                        )
                        state.evals_since_best = 0
                        save_best(state.step)
                    else:
                        state.evals_since_best += 1
                    state.history.append({"step": state.step, "val_loss": val_loss})
                    metrics.write(
                        event="eval",
                        step=state.step,
                        epoch=round(epoch_float, 4),
                        val_loss=val_loss,
                        best_val_loss=state.best_val_loss,
                    )
                    progress.note(
                        f"step {state.step}: validation loss {val_loss:.4f}"
                        + (
                            " (best so far)"
                            if improved
                            else f" (best {state.best_val_loss:.4f} at step {state.best_step})"
                        )
                    )
                    if cfg.early_stopping_patience and state.evals_since_best >= cfg.early_stopping_patience:
                        state.stop_reason = (
                            f"early stopping: validation loss did not improve by {cfg.early_stopping_min_delta} "
                            f"for {state.evals_since_best} evaluations"
                        )
                if evaluate_now or (cfg.save_every_steps and state.step % cfg.save_every_steps == 0):
                    state.elapsed = elapsed_before + time.perf_counter() - segment_start
                    if main:
                        ckpt.save_checkpoint(run, model, optimizer, scheduler, state)
                        ckpt.prune_checkpoints(run, cfg.keep_checkpoints, state.best_step)
                    accelerator.wait_for_everyone()
                if _any_process(accelerator, stop.requested):
                    state.elapsed = elapsed_before + time.perf_counter() - segment_start
                    if main:
                        ckpt.save_checkpoint(run, model, optimizer, scheduler, state)
                    raise Interrupted(run, stop.signal_name)
    finally:
        progress.close()

    # --- Outputs ------------------------------------------------------------------------------------------
    state.stop_reason = state.stop_reason or (
        "max_steps reached" if cfg.max_steps and state.step >= cfg.max_steps else "all epochs done"
    )
    state.elapsed = elapsed_before + time.perf_counter() - segment_start
    if main:
        _require_finite(model)
        _save_adapter(run / "last", model, tokenizer, encoder.template)
        if not len(data.val):  # nothing to choose by: the best adapter is the last one
            save_best(state.step)
    accelerator.wait_for_everyone()
    test_after = None
    if data.test and main:
        test_after = _test_scores(model, tokenizer, encoder, data.test, console, "fine-tuned", before=test_before)

    summary = {
        "steps": state.step,
        "epochs": round(state.epoch + state.step_in_epoch / max(1, steps_per_epoch), 4),
        "stop_reason": state.stop_reason,
        "best_step": state.best_step,
        "best_epoch": state.best_epoch,
        "best_val_loss": state.best_val_loss,
        "last_val_loss": state.history[-1]["val_loss"] if state.history else None,
        "train_seconds": round(state.elapsed, 2),
        "tokens": state.tokens,
        "target_tokens": state.target_tokens,
        "tokens_per_s": round(state.tokens / max(state.elapsed, 1e-9), 1),
        "nonfinite_steps": state.nonfinite_total,
        "trainable_parameters": n_trainable,
        "precision": str(dtype).removeprefix("torch."),
        "packing": packing,
        "processes": world,
        "batch_size": batch_size,  # the micro-batch at the end: batch_size auto's choice, halved after out of memory
        "gradient_accumulation_steps": per_step // world // batch_size,
        "adapter": str(run / "adapter"),
        "test_before": test_before,
        "test_after": test_after,
    }
    summary |= peak_memory(device)
    trackers.finish(summary)
    if main:
        atomic_write(run / "summary.json", json.dumps(summary, indent=1))
        write_report(run)
        best = (
            ""
            if state.best_val_loss is None  # no validation set (or none of it fit max_length)
            else f". Best validation loss {state.best_val_loss:.4f} at step {state.best_step}"
        )
        console.info(
            f"done in {format_seconds(state.elapsed)}: {state.stop_reason}{best}; adapter in {run / 'adapter'}; "
            f"report in {run / 'report.md'}"
        )
    return summary


# --- Pieces of the loop, in the order they are used -----------------------------------------------------------


def lr_factor(kind: str, warmup_steps: int, total_steps: int):
    """Multiplier of the learning rate after `step` updates: linear warmup, then the schedule down to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _any_process(accelerator, flag: bool) -> bool:
    return _all_sum(accelerator, float(flag)) > 0


def _all_sum(accelerator, value: float) -> float:
    if accelerator.num_processes == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=accelerator.device)
    return float(accelerator.reduce(tensor, reduction="sum"))


def _clip(accelerator, params, max_norm: float) -> float:
    if max_norm > 0:
        return float(accelerator.clip_grad_norm_(params, max_norm))
    grads = [p.grad for p in params if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def _val_loss(loss_module, data: Prepared, batch_size: int, packing, buckets, tokenizer, device, accelerator) -> float:
    total, count = dataset_loss(
        loss_module,
        data.val,
        batch_size,
        packing,
        tokenizer.pad_token_id,
        device,
        shard=(accelerator.process_index, accelerator.num_processes),
        buckets=buckets,
    )
    return _all_sum(accelerator, total) / _all_sum(accelerator, count)


def _halve_after_oom(batch_size: int, world: int, mem, optimizer, state, device) -> int:
    """Free the failed step's gradients and return the halved micro-batch that replays it; the step keeps its
    examples, so the update is the same (the loss is normalised by the step's target count)."""
    if batch_size == 1 or world > 1:  # other processes would wait for this one forever: stop all with the fixes
        raise UserError(
            mem.out_of_memory(batch_size) + (f" (halving is not tried with {world} processes)" if world > 1 else ""),
            exit_code=1,
        )
    optimizer.zero_grad(set_to_none=True)
    state.pass_in_step, state.step_loss_sum = 0, 0.0
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return batch_size // 2


def _confirm_batch_size(loss_module, train, cfg, largest, mem, packing, pad_id, device, console) -> tuple[int, int]:
    """batch_size auto on a GPU: run the chosen size's largest pass of real data, halving until it fits."""
    effective = cfg.batch_size * cfg.gradient_accumulation_steps
    batch_size, size = cfg.batch_size, largest
    while True:
        try:
            batch = collate(train, list(size.examples), packing, pad_id).to(device)
            loss_module(batch).backward()
            ok = True
        except torch.OutOfMemoryError:
            ok = False
        loss_module.zero_grad(set_to_none=True)
        batch = None
        torch.cuda.empty_cache()
        if ok:
            return batch_size, effective // batch_size
        if batch_size == 1:
            raise UserError(mem.out_of_memory(1), exit_code=1)
        batch_size = max(d for d in range(1, batch_size) if effective % d == 0)
        console.warn(f"batch_size auto: the trial pass ran out of memory; trying batch_size {batch_size}")
        size = memory.largest_pass(
            mem.mm, cfg, batch_size, effective // batch_size, train.lengths, train.target_counts, packing
        )


def _test_scores(model, tokenizer, encoder, examples, console, label, before=None) -> dict:
    """Greedy answers to the held-out test prompts, scored against their references."""
    with torch.compiler.set_stance("force_eager"):  # decoding one token at a time would recompile compiled layers
        predictions, references = answer(model, tokenizer, encoder, examples)
    scores = score(predictions, references)
    shown = ", ".join(f"{k.replace('_', ' ')} {v:.1%}" for k, v in scores.items())
    console.info(f"held-out test ({len(examples)} examples), {label}: {shown}")
    if before is not None:
        _show_samples(console, examples, before["samples"], predictions)
    return {**scores, "samples": predictions[:2]}


def _show_samples(console, examples, before: list[str], after: list[str]) -> None:
    from rich.table import Table

    table = Table(title="sample generations (held-out)", show_lines=True)
    for column in ("prompt", "base model", "fine-tuned"):
        table.add_column(column, overflow="fold")
    for ex, b, a in zip(examples[:2], before, after):
        table.add_row(prompt_text(ex), b, a)
    if console.enabled:
        console.out.print(table)


class _Metrics:
    """metrics.jsonl, one JSON object per event, also sent to the trackers; a resumed run continues after the
    checkpoint's last line."""

    def __init__(self, path: Path, state, trackers: Trackers, enabled: bool):
        self.path, self.state, self.trackers, self.enabled = path, state, trackers, enabled
        if enabled and path.is_file():
            lines = path.read_text().splitlines(keepends=True)[: state.metrics_lines]
            atomic_write(path, "".join(lines))

    def write(self, **record) -> None:
        self.state.metrics_lines += 1
        if self.enabled:
            record = {k: _round(v) for k, v in record.items()}
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.trackers.log(record)


def _round(v):
    return float(f"{v:.7g}") if isinstance(v, float) and math.isfinite(v) else v


class _BestAdapter:
    def __init__(self, run: Path, model, tokenizer, template: str, enabled: bool):
        self.run, self.model, self.tokenizer, self.template, self.enabled = run, model, tokenizer, template, enabled

    def __call__(self, step: int) -> None:
        if self.enabled:
            _require_finite(self.model)
            _save_adapter(self.run / "adapter", self.model, self.tokenizer, self.template)


def _save_adapter(path: Path, model, tokenizer, template: str) -> None:
    """The adapter in PEFT's format, with the tokenizer and chat template it was trained with."""
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.chat_template = template
        tokenizer.save_pretrained(tmp)


def _require_finite(model) -> None:
    for name, p in model.named_parameters():
        if p.requires_grad and not torch.isfinite(p).all():
            raise UserError(f"the adapter has non-finite weights ({name}); refusing to save it", exit_code=1)


def _fingerprint(cfg: TrainConfig, model_path: str) -> dict:
    """What must not change between a run and its resumption: data and model files, by content hash."""
    out = {}
    for key in ("train_data", "val_data"):
        value = getattr(cfg, key)
        if value and Path(value).exists():
            out[key] = file_digest(value)
    weights = [p for p in Path(model_path).glob("*.safetensors")] if Path(model_path).is_dir() else []
    out["model"] = file_digest(weights[0]) if len(weights) == 1 else model_path
    return out


def _resume(run, cfg, fingerprint, model, optimizer, scheduler, console):
    saved = read_run_config(run)
    changed = [
        f"{k}: {getattr(saved, k)!r} -> {getattr(cfg, k)!r}"
        for k in TrainConfig.model_fields
        if k not in RESUMABLE_CHANGES and getattr(saved, k) != getattr(cfg, k)
    ]
    if changed:
        raise UserError(
            f"cannot resume {run}: the config changed ({'; '.join(changed)}). "
            "Use the original settings, or --overwrite to start over"
        )
    try:
        old = json.loads((run / "fingerprint.json").read_text())
    except (OSError, ValueError):  # stopped before the run's first files were all written, or damaged
        raise UserError(
            f"cannot resume {run}: its fingerprint.json (what the data and model were) is missing or "
            "damaged, so the run cannot be checked; start over with --overwrite"
        ) from None
    moved = [k for k in old if old[k] != fingerprint.get(k)]
    if moved:
        raise UserError(f"cannot resume {run}: {', '.join(moved)} changed since the run started (content hash differs)")
    ckpt.clean_leftovers(run)
    found = ckpt.list_checkpoints(run)
    if not found:
        console.info(f"{run} has no checkpoint yet: starting from the beginning")
        return ckpt.TrainState(), None
    for path in reversed(found):  # newest first; a damaged one falls back to an older one
        try:
            state, partial = ckpt.load_checkpoint(path, model, optimizer, scheduler)
        except (OSError, RuntimeError, KeyError, ValueError, EOFError, pickle.UnpicklingError) as e:
            console.warn(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e)[:120]}); trying an older one")
            continue
        console.info(f"resuming from {path} (step {state.step}, epoch {state.epoch})")
        return state, partial
    raise UserError(f"cannot resume {run}: no readable checkpoint; use --overwrite to start over")


def _check_step_shape(state, partial, per_step: int, world: int) -> None:
    """A run resumes exactly when each optimizer step still takes the same examples."""
    if state.examples_per_step and state.examples_per_step != per_step:
        raise UserError(
            f"cannot resume: the checkpoint took {state.examples_per_step} examples per optimizer step, this launch "
            f"would take {per_step} (batch_size x gradient_accumulation_steps x processes); choose values whose "
            f"product is {state.examples_per_step}"
        )
    if partial is not None and world > 1:
        raise UserError(
            "cannot resume: this checkpoint was taken in the middle of a step by one process; "
            "resume it with one process"
        )


def _save_interrupted(run, model, optimizer, scheduler, state, trainable, elapsed_before, segment_start, main):
    state.elapsed = elapsed_before + time.perf_counter() - segment_start
    grads = [p.grad.detach().cpu() if p.grad is not None else torch.zeros_like(p, device="cpu") for p in trainable]
    if main:
        ckpt.save_checkpoint(run, model, optimizer, scheduler, state, partial_grads=grads)


def _nonfinite_diagnosis(cfg, state, data, examples, dtype) -> str:
    origins = sorted({data.train.origins[i] for i in examples})[:5]
    return (
        f"training stopped: {state.nonfinite_streak} updates in a row had a NaN or infinite loss or gradient "
        f"(last at step {state.step}; learning_rate={cfg.learning_rate:g}, base precision "
        f"{str(dtype).removeprefix('torch.')}). Examples in the last step include: {'; '.join(origins)}. "
        "Try a lower learning_rate, precision fp32 or bf16, or check those examples. The last good checkpoint is kept."
    )


class _StopRequest:
    """Ctrl-C / SIGTERM ask the loop to checkpoint and stop at the next pass boundary; a second Ctrl-C stops now."""

    def __init__(self):
        self.requested = False
        self.signal_name = ""
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        print(
            f"\n{self.signal_name} received: saving a checkpoint after the current pass (Ctrl-C again to quit now)",
            flush=True,
        )

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False
