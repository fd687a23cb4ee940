"""One training run of one trainer, in its own process so that its peak memory is its own.

    python -m bench.worker SPEC.json RESULT.json

Every worker imports the same libraries (those of all three trainers) before memory is measured, so the peak
compares training, not import footprints. Time counts the training loop only: for the reference trainers from
`on_train_begin` to `on_train_end` (data loading, forward, backward, optimizer, logging), for loratune the sum
of its per-step times in metrics.jsonl (the same work; its final checkpoint save is left out).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import datasets
import peft  # noqa: F401  (imported up front by every worker, see above)
import torch
import transformers

from loratune import TrainConfig, train
from loratune.commands.plan import plan_run
from loratune.core.device import DTYPES
from loratune.modeling.model import load_tokenizer
from loratune.training.setup import lr_factor

if importlib.util.find_spec("trl"):  # where TRL is not installed (a GPU without its wheel) only (b) cannot run
    import trl  # noqa: F401


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    memory = PeakMemory(spec["device"])
    if spec["trainer"].startswith("trl_dpo"):  # the DPO workload's reference trainer (bench/worker_dpo.py)
        from .worker_dpo import run_trl_dpo as run
    else:
        run = {"hf": run_reference, "trl": run_reference}.get(spec["trainer"], run_loratune)
    result = run(spec)
    result.update(memory.read())
    Path(sys.argv[2]).write_text(json.dumps(result))


class PeakMemory:
    """Peak memory from construction on: the RSS high-water mark (reset here) on CPU, allocated bytes on CUDA."""

    def __init__(self, device: str):
        self.device = device
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS
        if device == "cuda":
            torch.cuda.init()
            torch.cuda.reset_peak_memory_stats()
        self.start_rss_mib = _status_mib("VmRSS")

    def read(self) -> dict:
        out = {"peak_rss_mib": _status_mib("VmHWM"), "start_rss_mib": self.start_rss_mib}
        if self.device == "cuda":
            out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
        return out


def _status_mib(field: str) -> float:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


# --- (a) HF Trainer and (b) TRL SFTTrainer ----------------------------------------------------------------------


def run_reference(spec: dict) -> dict:
    """HF Trainer with dynamic padding, or TRL's SFTTrainer padding-free, on the pre-tokenized examples.

    The examples arrive in loratune's training order and are read sequentially, so each optimizer step of every
    trainer holds the same examples.
    """
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    padding_free = spec["trainer"] == "trl"
    attention = _attention(spec["device"], padding_free)
    tokenizer = load_tokenizer(spec["model_path"])  # pad = eos when the model has no pad token, as in loratune
    tokenizer.padding_side = "right"
    model = peft_model(spec, attention)
    data = datasets.Dataset.from_dict(json.loads(Path(spec["tokens"]).read_text()))
    if padding_free:
        from trl import SFTConfig, SFTTrainer

        # Padding-free without TRL's bfd packing: each micro-batch's examples become one row, so micro-batches keep
        # `batch_size` examples (bfd packing would regroup examples into max_length rows, changing the steps).
        args = SFTConfig(**trainer_args(spec), padding_free=True, packing=False, max_length=None)
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=data, processing_class=tokenizer, optimizers=optimizers(model, spec)
        )
    else:
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
        trainer = Trainer(
            model=model,
            args=TrainingArguments(**trainer_args(spec)),
            train_dataset=data,
            data_collator=collator,
            optimizers=optimizers(model, spec),
        )
    counter = _CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    return train_timed(trainer, spec) | {
        "tokens": counter.real,
        "processed_tokens": counter.processed,
        "targets": counter.targets,
        "attention": attention,
    }


def peft_model(spec: dict, attention: str):
    """The base in the run's number format with PEFT's LoRA on all linear layers, seeded as loratune seeds its
    adapters (the same initial weights)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[spec["precision"]]
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=dtype, attn_implementation=attention)
    model.config.use_cache = False
    torch.manual_seed(spec["seed"])  # as loratune does right before adding the adapters: same initial LoRA weights
    lora = LoraConfig(
        r=spec["lora_r"],
        lora_alpha=spec["lora_alpha"],
        lora_dropout=spec["lora_dropout"],
        target_modules="all-linear",
        task_type="CAUSAL_LM",
        use_dora=spec["use_dora"],
    )
    return get_peft_model(model, lora, autocast_adapter_dtype=True).to(spec["device"])


def optimizers(model, spec: dict) -> tuple:
    """AdamW and loratune's schedule (linear warmup over ceil(warmup_ratio x steps) steps from lr/(warmup+1), then
    cosine), built here because the Trainer's own warmup starts from 0 and would spend the first step at lr 0."""
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=spec["learning_rate"], weight_decay=0.0
    )
    warmup = math.ceil(spec["warmup_ratio"] * spec["steps"])
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor("cosine", warmup, spec["steps"]))


def trainer_args(spec: dict) -> dict:
    """The Trainer arguments every reference trainer shares: the step, no checkpoints, evaluation or gradient
    checkpointing, the examples read in the order given."""
    return dict(
        output_dir=spec["out_dir"],
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=spec["grad_accum"],
        max_steps=spec["steps"],
        learning_rate=spec["learning_rate"],
        max_grad_norm=1.0,
        seed=spec["seed"],
        bf16=spec["precision"] == "bf16",
        gradient_checkpointing=False,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=spec["device"] == "cpu",
    )


def train_timed(trainer, spec: dict) -> dict:
    """Train; the loop's time, each step's, and the logged loss and learning rate of every step."""
    clock = _Clock(spec["device"])
    trainer.add_callback(clock)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    return {
        "seconds": clock.seconds,
        "step_seconds": clock.steps,
        "losses": [e["loss"] for e in logs],
        "lrs": [e["learning_rate"] for e in logs],
    }


def _attention(device: str, padding_free: bool) -> str:
    """SDPA, as transformers defaults to. Padding-free rows without flash attention get SDPA with a block-diagonal
    mask that transformers builds from the restarting position ids: correct, but dense over the whole row. On CUDA
    TRL's padding-free mode is meant for flash attention, so it gets flash_attention_2 when installed."""
    if device == "cuda" and padding_free and importlib.util.find_spec("flash_attn"):
        return "flash_attention_2"
    return "sdpa"


class _CountingCollator:
    """Counts real tokens (the examples' own), processed tokens (real + padding) and loss-carrying tokens."""

    def __init__(self, collate):
        self.collate, self.real, self.processed, self.targets = collate, 0, 0, 0

    def __call__(self, features):
        self.real += sum(len(f["input_ids"]) for f in features)
        self.targets += sum(label != -100 for f in features for label in f["labels"][1:])
        batch = self.collate(features)
        self.processed += batch["input_ids"].numel()
        return batch


class _Clock(transformers.TrainerCallback):
    """The training loop's time, and each optimizer step's (from the end of the one before)."""

    def __init__(self, device: str):
        self.device, self.start, self.seconds, self.steps, self.last = device, 0.0, 0.0, [], 0.0

    def _now(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.last = self._now()

    def on_step_end(self, args, state, control, **kwargs):
        now = self._now()
        self.steps.append(now - self.last)
        self.last = now

    def on_train_end(self, args, state, control, **kwargs):
        self.seconds = self._now() - self.start


# --- (c) loratune, through its public API ----------------------------------------------------------------------


def run_loratune(spec: dict) -> dict:
    """loratune's run of the workload; a DPO run reads and keeps its reference log-probabilities in the cache
    folder `spec["cache"]` (fresh: computed in the run; filled by an earlier run: read from it)."""
    out = Path(spec["out_dir"])
    dpo = spec["objective"] == "dpo"
    if "cache" in spec:
        os.environ["LORATUNE_CACHE"] = spec["cache"]
    written = _reference_files(spec)
    config = TrainConfig(
        model=spec["model_path"],
        objective=spec["objective"],
        **({"beta": spec["beta"]} if dpo else {}),
        train_data=spec["data"],
        val_ratio=0,
        batch_size=spec["batch_size"],
        gradient_accumulation_steps=spec["grad_accum"],
        max_length=spec["max_length"],
        learning_rate=spec["learning_rate"],
        epochs=1,
        max_steps=spec["steps"],
        warmup_ratio=spec["warmup_ratio"],
        lora_r=spec["lora_r"],
        lora_alpha=spec["lora_alpha"],
        lora_dropout=spec["lora_dropout"],
        use_dora=spec["use_dora"],
        seed=spec["seed"],
        precision=spec["precision"],
        device=spec["device"],
        early_stopping_patience=0,
        output_dir=str(out),
    )
    summary = train(config, overwrite=True)
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["event"] == "train"]
    return _plan_estimate(config) | {
        "seconds": sum(r["seconds"] for r in steps),
        "step_seconds": [r["seconds"] for r in steps],
        "tokens": summary["tokens"],
        **({"pairs": summary["pairs"]} if dpo else {"targets": summary["target_tokens"]}),
        "reference_written": _reference_files(spec) - written,
        "processed_tokens": round(sum(r["tokens"] / (1 - r["padding_share"]) for r in steps)),
        "losses": [r["loss"] for r in steps],
        "lrs": [r["lr"] for r in steps],
        "attention": "packed" if summary["packing"] else "sdpa",
        "loop_seconds": summary["train_seconds"],
    }


def _reference_files(spec: dict) -> int:
    """Files of reference log-probabilities in the run's cache: a run that computed some writes one at least."""
    return len(list(Path(spec["cache"]).glob("reference/*/*.npz"))) if "cache" in spec else 0


def _plan_estimate(config: TrainConfig) -> dict:
    """`loratune plan`'s peak for this run: in all, and without the framework overhead that allocated-memory
    counters do not see. Asked after training, so that planning adds nothing to the measured peak; a failure to
    plan is reported, not fatal to the speed measurement."""
    try:
        plan = plan_run(config, tokens_per_second=1.0)
    except Exception as e:
        return {"plan_error": f"{type(e).__name__}: {e}"}
    overhead = sum(v for k, v in plan.items.items() if k.startswith("framework overhead"))
    return {"plan_mib": plan.total / 2**20, "plan_tensors_mib": (plan.total - overhead) / 2**20}


if __name__ == "__main__":
    main()
