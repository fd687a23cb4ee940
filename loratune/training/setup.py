"""Setting a run up, piece by piece: devices, data, step plan, model with adapters, optimizer and schedule, and
the run folder (fresh, or resumed from its last checkpoint)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ..core.config import TrainConfig
from ..core.console import Console
from ..core.device import choose_dtype, keep_freed_cpu_memory, resolve_device
from ..core.errors import UserError
from ..core.files import atomic_write
from ..core.presets import guide_warnings
from ..core.sources import dump_yaml
from ..data.encode import encoder_for
from ..data.plan import StepPlan, plan_for, wants_shape_buckets
from ..data.prepare import Prepared, prepare
from ..memory.arithmetic import ModelShape
from ..memory.guard import RunMemory
from ..memory.planner import largest_pass
from ..memory.shape import read_shape
from ..modeling.adapter import check_kernels, trainable_model
from ..modeling.loss import CausalLMLoss
from ..modeling.model import generation_end_ids, load_model, load_tokenizer, resolve_model
from . import checkpoint as ckpt
from . import zero
from .engine import LaunchRefused, held_here, shard, start
from .metrics import Metrics
from .resolved import ResolvedRun
from .run_folder import check_output_dir, check_resumable, clean_leftovers, create_output_dir, fingerprint
from .session import Session
from .tracking import Trackers


def setup(config: TrainConfig, *, resume: bool, overwrite: bool, console: Console | None) -> Session:
    """Everything before the first step; a run that cannot work stops here, before it writes anything."""
    from accelerate.utils import set_seed

    run = Path(config.output_dir or "runs/run")
    if resume and not ckpt.list_checkpoints(run) and not (run / "config.yaml").is_file():
        raise UserError(f"--resume: {run} holds no checkpoint to resume from")
    accelerator, engine, dtype = _devices(config)
    console = console or Console(enabled=accelerator.is_main_process)
    console.info(engine.describe())
    check_output_dir(run, overwrite=overwrite, resume=resume)
    trackers = Trackers(config.report_to, enabled=accelerator.is_main_process)  # a missing package stops here
    for warning in guide_warnings(config):
        console.warn(warning)
    set_seed(config.seed)

    model_path = resolve_model(config.model)
    tokenizer, encoder, data = load_data(config, model_path, accelerator, console)
    shape = read_shape(model_path, config)
    memory = RunMemory(config, shape, accelerator.device, dtype, engine.processes if engine.sharded else 1, engine.kind)
    plan, batch_size_from = plan_steps(config, data, shape, memory, accelerator, dtype, console)
    model, plan = load_trainable_model(config, model_path, dtype, engine.load_device, plan, encoder, console)
    loss_module = CausalLMLoss(model, shape_buckets=plan.buckets)
    if config.batch_size == "auto" and accelerator.device.type == "cuda" and not engine.sharded:
        plan = confirm_batch_size(loss_module, data, plan, memory, tokenizer.pad_token_id, accelerator.device, console)
    _describe_model(config, model, accelerator.device, dtype, console)
    if engine.sharded:  # before the optimizer: FSDP2's sharding replaces the parameters
        _shard_weights(config, run, model, loss_module, engine, bool(data.test), console)

    total_steps = plan.steps_per_epoch * config.epochs
    total_steps = total_steps if config.max_steps is None else min(config.max_steps, total_steps)
    warmup_steps = math.ceil(config.warmup_ratio * total_steps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(config, trainable, accelerator.device, total_steps, warmup_steps)
    if engine.deepspeed:
        loss_module, optimizer = zero.prepare(accelerator, loss_module, optimizer, plan.micro_batch, config)
        if engine.sharded:
            console.info(held_here(model, engine))
    elif not engine.sharded:  # DDP (or nothing, for one process)
        loss_module, optimizer = accelerator.prepare(loss_module, optimizer)
    resolved = ResolvedRun.of(
        plan,
        device=accelerator.device,
        precision=str(dtype).removeprefix("torch."),
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        batch_size_from=batch_size_from,
    )
    _describe_steps(data, resolved, console)
    val_plan = _validation_plan(config, data, plan, engine)
    session = Session(
        config,
        run,
        accelerator,
        engine,
        console,
        accelerator.device,
        dtype,
        tokenizer,
        encoder,
        data,
        model,
        loss_module,
        trainable,
        optimizer,
        scheduler,
        plan,
        val_plan,
        resolved,
        memory,
        trackers,
    )
    open_run_folder(session, model_path, resume=resume, overwrite=overwrite)
    return session


def _shard_weights(config: TrainConfig, run: Path, model, loss_module, engine, has_test: bool, console) -> None:
    """Each process keeps its shard of the weights: FSDP2's now (torch's fully_shard, in training.engine), ZeRO-3's
    when DeepSpeed's engine is set up (training.zero)."""
    if has_test:
        console.warn(
            f"the held-out test set is not answered during an {engine.kind} run (each generated token would gather "
            f"the weights from every process); score it afterwards with: loratune eval {run} --data "
            f"{config.test_data} --generate"
        )
    if engine.kind == "FSDP2":
        shard(loss_module, engine)
        console.info(held_here(model, engine))


def _validation_plan(config: TrainConfig, data, plan, engine):
    """Validation's passes, split like training's (sharded: every process runs every validation pass)."""
    return plan_for(
        config,
        data.val.lengths,
        data.val.target_counts,
        packing=plan.packing,
        processes=1 if engine.sharded else plan.processes,
        buckets=plan.buckets,
    ).with_micro_batch(plan.micro_batch)


def _devices(cfg: TrainConfig):
    """This process's accelerator and engine (the launch checked) and the frozen base's dtype; optional kernels
    are checked first."""
    wanted = resolve_device(cfg.device)
    check_kernels(cfg, wanted)
    if wanted.type == "cpu":
        keep_freed_cpu_memory()
    dtype = choose_dtype(cfg.precision, wanted)
    accelerator, engine = start(wanted, "fp16" if dtype == torch.float16 else "no")
    if (engine.sharded or engine.deepspeed) and cfg.load_in_4bit:
        raise LaunchRefused(
            f"load_in_4bit: loratune does not run {engine.kind} on 4-bit weights; use DDP, or a 16-bit base"
        )
    if engine.deepspeed and dtype == torch.float16:  # accelerate would turn on DeepSpeed's fp16, which casts LoRA too
        raise LaunchRefused(f"precision fp16: {engine.kind} would train the LoRA weights in fp16 too; use bf16 or fp32")
    return accelerator, engine, dtype


def load_data(cfg: TrainConfig, model_path: str, accelerator, console: Console):
    """The tokenizer, the encoder (chat template, labels) and the tokenized data, with the data report printed."""
    tokenizer = load_tokenizer(model_path)
    encoder = encoder_for(tokenizer, cfg)
    with accelerator.main_process_first():  # the others then read the tokenization cache the first one wrote
        data = prepare(cfg, encoder)
    for is_warning, line in data.report.lines():
        (console.warn if is_warning else console.info)(line)
    return tokenizer, encoder, data


def plan_steps(
    cfg: TrainConfig, data: Prepared, shape: ModelShape, memory: RunMemory, accelerator, dtype, console: Console
) -> tuple[StepPlan, str]:
    """The training set's steps and passes, with `batch_size: auto` chosen; stops now, before any weight is
    loaded, when even the smallest micro-batch cannot fit. Returns the plan and where its batch size came from."""
    packing = cfg.packing and shape.packs
    plan = plan_for(
        cfg,
        data.train.lengths,
        data.train.target_counts,
        packing=packing,
        processes=accelerator.num_processes,
        buckets=packing and wants_shape_buckets(accelerator.device, dtype),
    )
    if cfg.batch_size == "auto":
        choice = memory.choose_batch_size(plan)
        console.info(choice.reason)
        return plan.with_micro_batch(choice.batch_size), "batch_size auto"
    if warning := memory.check(plan):
        console.warn(warning)
    return plan, "config"


def load_trainable_model(
    cfg: TrainConfig, model_path: str, dtype, device, plan: StepPlan, encoder, console: Console
) -> tuple[torch.nn.Module, StepPlan]:
    """The frozen base with LoRA adapters, set up for training; the plan unpacked if the model cannot pack."""
    base = load_model(model_path, dtype, device, load_in_4bit=cfg.load_in_4bit)
    encoder.end_ids |= generation_end_ids(base)
    model, packing, warnings = trainable_model(base, cfg, plan.packing)
    for warning in warnings:
        console.warn(warning)
    return model, replace(plan, packing=False, buckets=False) if packing != plan.packing else plan


def confirm_batch_size(
    loss_module, data: Prepared, plan: StepPlan, memory: RunMemory, pad_id: int, device, console: Console
) -> StepPlan:
    """batch_size auto on a GPU: run the chosen size's largest pass of real data, halving until it fits."""
    share = plan.examples_per_step // plan.processes
    while True:
        try:
            batch = plan.batch(data.train, largest_pass(memory.mm, plan).examples, pad_id).to(device)
            loss_module(batch).backward()
            fits = True
        except torch.OutOfMemoryError:
            fits = False
        loss_module.zero_grad(set_to_none=True)
        batch = None
        torch.cuda.empty_cache()
        if fits:
            return plan
        if plan.micro_batch == 1:
            raise UserError(memory.out_of_memory(plan), exit_code=1)
        plan = plan.with_micro_batch(max(d for d in range(1, plan.micro_batch) if share % d == 0))
        console.warn(f"batch_size auto: the trial pass ran out of memory; trying batch_size {plan.micro_batch}")


def make_optimizer(cfg: TrainConfig, trainable, device, total_steps: int, warmup_steps: int):
    """AdamW on the adapter's weights, and the learning-rate schedule (linear warmup, then cfg's)."""
    optimizer = torch.optim.AdamW(
        trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=device.type == "cuda" or None
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


def open_run_folder(s: Session, model_path: str, *, resume: bool, overwrite: bool) -> None:
    """Only now, with data and model loaded, does the run folder appear: fresh, or resumed at its checkpoint."""
    if s.main:
        create_output_dir(s.run, overwrite=overwrite, resume=resume)
    s.accelerator.wait_for_everyone()
    current = fingerprint(s.cfg, model_path)
    if resume:
        _resume(s, current)
    elif s.main:
        atomic_write(s.run / "config.yaml", dump_yaml(s.cfg))
        atomic_write(s.run / "data.json", json.dumps(asdict(s.data.report), indent=1))
        atomic_write(s.run / "fingerprint.json", json.dumps(current, indent=1))
        (s.run / "metrics.jsonl").write_text("")
    if s.main:
        s.resolved.write(s.run)
    s.metrics = Metrics(s.run / "metrics.jsonl", s.state, s.trackers, enabled=s.main)
    s.trackers.start(s.run, s.cfg.model_dump(), s.state.step)


def _resume(s: Session, current: dict) -> None:
    """Continue from the run folder's newest readable checkpoint, after checking that nothing that would change
    the result has changed (config, data, model, examples per step)."""
    check_resumable(s.run, s.cfg, current)
    saved = ResolvedRun.read(s.run)
    clean_leftovers(s.run)
    restored = ckpt.resume_state(s.run, s.model, s.loss_module, s.optimizer, s.scheduler, s.console)
    if restored is None:
        return
    s.state, s.partial = restored
    s.elapsed_before = s.state.elapsed
    if saved and saved.examples_per_step != s.plan.examples_per_step:
        raise UserError(
            f"cannot resume: the checkpoint took {saved.examples_per_step} examples per optimizer step, this launch "
            f"would take {s.plan.examples_per_step} (batch_size x gradient_accumulation_steps x processes); choose "
            f"values whose product is {saved.examples_per_step}"
        )
    if s.partial is not None and (s.processes > 1 or s.engine.deepspeed):
        raise UserError(
            "cannot resume: this checkpoint was taken in the middle of a step by one process; "
            "resume it with one process, without DeepSpeed"
        )
    if s.partial is not None and s.state.micro_batch:  # its passes must line up with those already done
        s.plan = s.plan.with_micro_batch(s.state.micro_batch)
        s.resolved = s.resolved.with_plan(s.plan, "the checkpoint's, taken in the middle of a step")


def _describe_model(cfg: TrainConfig, model, device, dtype, console: Console) -> None:
    numel = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]  # ZeRO-3: whole
    n_trainable = sum(n for n, trained in numel if trained)
    n_total = sum(n for n, _ in numel)
    console.info(
        f"model {cfg.model} on {device.type} ({str(dtype).removeprefix('torch.')} base, fp32 LoRA): "
        f"{n_trainable:,} trainable of {n_total:,} parameters ({100 * n_trainable / n_total:.2f}%)"
    )


def _describe_steps(data: Prepared, r: ResolvedRun, console: Console) -> None:
    console.info(
        f"{len(data.train)} training examples, {len(data.val)} validation; effective batch {r.examples_per_step} = "
        f"batch_size {r.batch_size} x gradient_accumulation_steps {r.gradient_accumulation_steps}"
        + (f" x {r.processes} processes" if r.processes > 1 else "")
        + f"; {r.total_steps} optimizer steps ({r.steps_per_epoch} per epoch), {r.warmup_steps} warmup"
        + f"; {'packed rows' if r.packing else 'padded batches'}"
    )
