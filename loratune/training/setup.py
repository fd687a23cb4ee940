"""Setting a run up, piece by piece: devices, data, step plan, model with adapters, optimizer and schedule, and
the run folder (fresh, or resumed from its last checkpoint)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import torch

from ..core.config import TrainConfig
from ..core.console import Console
from ..core.device import choose_dtype, keep_freed_cpu_memory, resolve_device
from ..core.errors import UserError
from ..core.files import atomic_write, file_digest
from ..core.presets import guide_warnings
from ..core.sources import dump_yaml, read_run_config
from ..data.encode import encoder_for
from ..data.prepare import Prepared, prepare
from ..memory.guard import RunMemory
from ..memory.planner import largest_pass
from ..memory.shape import read_shape
from ..modeling.adapter import check_kernels, trainable_model
from ..modeling.model import generation_end_ids, load_model, load_tokenizer, resolve_model
from ..modeling.objective import objective_for
from ..modeling.reference import reference_adapter, with_reference
from ..modeling.variants import param_groups, variant_notes
from ..planning.resolved import ResolvedRun, resolve
from . import checkpoint as ckpt
from .engine import start
from .metrics import Metrics
from .run_folder import check_output_dir, check_resumable, clean_leftovers, create_output_dir, fingerprint
from .session import Session, Training
from .tracking import Trackers


def setup(config: TrainConfig, *, resume: bool, overwrite: bool, console: Console | None) -> Session:
    """Everything before the first step; a run that cannot work stops here, before it writes anything."""
    from accelerate.utils import set_seed

    run = Path(config.output_dir or "runs/run")
    if resume and not ckpt.list_checkpoints(run) and not (run / "config.yaml").is_file():
        raise UserError(f"--resume: {run} holds no checkpoint to resume from")
    engine, dtype = _devices(config)
    console = console or Console(enabled=engine.accelerator.is_main_process)
    console.info(engine.describe())
    check_output_dir(run, overwrite=overwrite, resume=resume)
    trackers = Trackers(config.report_to, enabled=engine.accelerator.is_main_process)  # a missing package stops here
    for warning in guide_warnings(config):
        console.warn(warning)
    set_seed(config.seed)

    model_path = resolve_model(config.model)
    if config.reference:  # a wrong run to train on top of is refused before any data or weights load
        reference_adapter(config.reference, config.model)
    checkpoint, saved = _resume_point(run, config, model_path, engine, console) if resume else (None, None)
    tokenizer, encoder, data = load_data(config, model_path, engine.accelerator, console)
    shape = read_shape(model_path, config)
    memory = RunMemory(config, shape, engine.device, dtype, engine.shards, engine.sharding)
    resolved = _resolve(config, memory, engine, data, checkpoint, saved, console)
    objective = objective_for(config, encoder)
    objective.use_stored(data, lambda: _identity(config, model_path, dtype, engine.device))
    model = load_trainable_model(config, model_path, dtype, engine.load_device, resolved, encoder, console)
    module = objective.module(model, shape_buckets=resolved.shape_buckets)
    if config.batch_size == "auto" and engine.device.type == "cuda" and engine.holds_whole_model:
        resolved = confirm_batch_size(objective, module, data, resolved, memory, tokenizer.pad_token_id, console)
    _describe_model(config, model, engine.device, dtype, console)
    module, optimizer, scheduler = _engine_setup(config, run, engine, model, module, resolved, bool(data.test), console)
    _describe_steps(data, resolved, console)
    training = Training(resolved)
    if checkpoint is not None:
        ckpt.restore(checkpoint, engine, model, module, optimizer, scheduler)
        training = Training(resolved, checkpoint.state, checkpoint.partial, checkpoint.state.elapsed)
    metrics = open_run_folder(run, config, engine, data, training, trackers, model_path, resume, overwrite)
    trainable = [p for p in model.parameters() if p.requires_grad]
    parts = (tokenizer, encoder, data, objective, model, module, trainable, optimizer, scheduler, memory, trackers)
    return Session(config, run, engine, console, dtype, *parts, metrics, training)


def _identity(cfg: TrainConfig, model_path: str, dtype, device) -> list:
    """What decides the values a run computes of its frozen model (the reference log-probabilities): the base's
    weights, the adapter merged into it (`reference`, and what that run was trained on top of), number format and
    device type."""
    merged, run = [], cfg.reference
    while run:
        merged.append(file_digest(Path(run) / "adapter"))
        run = read_run_config(run).reference
    return [fingerprint(cfg, model_path)["model"], merged, str(dtype), torch.device(device).type]


def _resolve(cfg: TrainConfig, memory: RunMemory, engine, data, checkpoint, saved, console) -> ResolvedRun:
    """The run as `planning.resolved.resolve` works it out (what `loratune plan` shows), with a resumed cut step's
    micro-batch; stops now, before any weight is loaded, when even the smallest micro-batch cannot fit."""
    resolved, notes = resolve(
        cfg,
        memory.mm,
        memory.budget,
        device=engine.device,
        train=data.train,
        val=data.val,
        engine=engine.kind,
        processes=engine.processes,
    )
    for level, line in notes:
        if level == "refusal":
            raise UserError(line)
        (console.warn if level == "warning" else console.info)(line)
    if saved and saved.examples_per_step != resolved.examples_per_step:
        raise UserError(
            f"cannot resume: the checkpoint took {saved.examples_per_step} examples per optimizer step, this launch "
            f"would take {resolved.examples_per_step} (batch_size x gradient_accumulation_steps x processes); choose "
            f"values whose product is {saved.examples_per_step}"
        )
    if checkpoint is not None and checkpoint.partial is not None and checkpoint.state.micro_batch:
        # the cut step's passes must line up with those already done
        resolved = resolved.with_micro_batch(
            checkpoint.state.micro_batch, "the checkpoint's, taken in the middle of a step"
        )
    return resolved


def _resume_point(run: Path, cfg: TrainConfig, model_path: str, engine, console):
    """The checkpoint to resume from, read whole, and the run's saved resolved.json; after checking that nothing
    that would change the result has changed (config, data, model). Reads files only."""
    check_resumable(run, cfg, fingerprint(cfg, model_path))
    saved = ResolvedRun.read(run)
    if engine.accelerator.is_main_process:
        clean_leftovers(run)
    engine.accelerator.wait_for_everyone()
    checkpoint = ckpt.latest_checkpoint(run, console)
    if checkpoint is not None and checkpoint.partial is not None and not engine.may_cut_steps:
        raise UserError(
            "cannot resume: this checkpoint was taken in the middle of a step by one process; "
            "resume it with one process, without DeepSpeed"
        )
    return checkpoint, saved


def _engine_setup(cfg: TrainConfig, run: Path, engine, model, module, resolved: ResolvedRun, has_test: bool, console):
    """The module as the engine runs it, the optimizer and the schedule. Sharding comes before the optimizer: FSDP2
    replaces the parameters."""
    if not engine.holds_whole_model and has_test:
        console.warn(
            f"the held-out test set is not answered during an {engine.kind} run (each generated token would gather "
            f"the weights from every process); score it afterwards with: loratune eval {run} --data "
            f"{cfg.test_data} --generate"
        )
    engine.shard(module)
    groups = param_groups(model, cfg)
    optimizer, scheduler = make_optimizer(cfg, groups, engine.device, resolved.total_steps, resolved.warmup_steps)
    module, optimizer = engine.prepare(module, optimizer, resolved.batch_size, cfg)
    if held := engine.held_here(model):
        console.info(held)
    return module, optimizer, scheduler


def _devices(cfg: TrainConfig):
    """This process's engine (the launch checked) and the frozen base's dtype; optional kernels are checked first."""
    wanted = resolve_device(cfg.device)
    check_kernels(cfg, wanted)
    if wanted.type == "cpu":
        keep_freed_cpu_memory()
    dtype = choose_dtype(cfg.precision, wanted)
    engine = start(wanted, "fp16" if dtype == torch.float16 else "no")
    engine.check(cfg, dtype)
    return engine, dtype


def load_data(cfg: TrainConfig, model_path: str, accelerator, console: Console):
    """The tokenizer, the encoder (chat template, labels) and the tokenized data, with the data report printed."""
    tokenizer = load_tokenizer(model_path)
    encoder = encoder_for(tokenizer, cfg)
    with accelerator.main_process_first():  # the others then read the tokenization cache the first one wrote
        data = prepare(cfg, encoder)
    for is_warning, line in data.report.lines():
        (console.warn if is_warning else console.info)(line)
    return tokenizer, encoder, data


def load_trainable_model(
    cfg: TrainConfig, model_path: str, dtype, device, resolved: ResolvedRun, encoder, console: Console
) -> torch.nn.Module:
    """The frozen base with LoRA adapters, set up for training (packed attention when the run packs: the resolver
    asked the model's config whether it can)."""
    base = with_reference(load_model(model_path, dtype, device, load_in_4bit=cfg.load_in_4bit), cfg)
    encoder.end_ids |= generation_end_ids(base)
    model, packing, warnings = trainable_model(base, cfg, resolved.packing)
    for warning in warnings:
        console.warn(warning)
    assert packing == resolved.packing, "the model's attention contradicts its config's (memory.shape)"
    return model


def confirm_batch_size(
    objective, module, data: Prepared, resolved: ResolvedRun, memory: RunMemory, pad_id: int, console: Console
) -> ResolvedRun:
    """batch_size auto on a GPU: run the chosen size's largest pass of real data, smaller until it fits."""
    while True:
        plan = resolved.plan
        try:
            batch = objective.batch(plan, data.train, largest_pass(memory.mm, plan).examples, pad_id)
            objective.forward(module, batch.to(memory.device)).loss.backward()
            fits = True
        except torch.OutOfMemoryError:
            fits = False
        module.zero_grad(set_to_none=True)
        batch = None
        torch.cuda.empty_cache()
        if fits:
            return resolved
        smaller = resolved.smaller("batch_size auto, made smaller by its trial pass on the GPU")
        if smaller is None:
            raise UserError(memory.out_of_memory(plan), exit_code=1)
        resolved = smaller
        console.warn(f"batch_size auto: the trial pass ran out of memory; trying batch_size {resolved.batch_size}")


def make_optimizer(cfg: TrainConfig, groups, device, total_steps: int, warmup_steps: int):
    """AdamW on the adapter's weights (parameters, or groups with rates of their own), and the learning-rate
    schedule (linear warmup, then cfg's)."""
    optimizer = torch.optim.AdamW(
        groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=device.type == "cuda" or None
    )
    factor = lr_factor(cfg.lr_scheduler, warmup_steps, total_steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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


def open_run_folder(
    run: Path, cfg: TrainConfig, engine, data, training: Training, trackers, model_path: str, resume: bool, overwrite
) -> Metrics:
    """Only now, with data and model loaded, does the run folder appear: fresh, or resumed at its checkpoint."""
    main = engine.accelerator.is_main_process
    if main:
        create_output_dir(run, overwrite=overwrite, resume=resume)
    engine.accelerator.wait_for_everyone()
    if main and not resume:
        atomic_write(run / "config.yaml", dump_yaml(cfg))
        atomic_write(run / "data.json", json.dumps(asdict(data.report), indent=1))
        atomic_write(run / "fingerprint.json", json.dumps(fingerprint(cfg, model_path), indent=1))
        (run / "metrics.jsonl").write_text("")
    if main:
        training.resolved.write(run)
    metrics = Metrics(run / "metrics.jsonl", training.state, trackers, enabled=main)
    trackers.start(run, cfg.model_dump(), training.state.step)
    return metrics


def _describe_model(cfg: TrainConfig, model, device, dtype, console: Console) -> None:
    numel = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]  # ZeRO-3: whole
    n_trainable = sum(n for n, trained in numel if trained)
    n_total = sum(n for n, _ in numel)
    console.info(
        f"model {cfg.model} on {device.type} ({str(dtype).removeprefix('torch.')} base, fp32 LoRA): "
        f"{n_trainable:,} trainable of {n_total:,} parameters ({100 * n_trainable / n_total:.2f}%)"
    )
    for note in variant_notes(cfg):
        console.info(note)


def _describe_steps(data: Prepared, r: ResolvedRun, console: Console) -> None:
    console.info(
        f"{len(data.train)} training examples, {len(data.val)} validation; effective batch {r.examples_per_step} = "
        f"batch_size {r.batch_size} x gradient_accumulation_steps {r.gradient_accumulation_steps}"
        + (f" x {r.processes} processes" if r.processes > 1 else "")
        + f"; {r.total_steps} optimizer steps ({r.steps_per_epoch} per epoch), {r.warmup_steps} warmup"
        + f"; {'packed rows' if r.packing else 'padded batches'}"
    )
