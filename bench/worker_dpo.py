"""The DPO workload's reference: TRL's DPOTrainer + PEFT, run by `bench.worker` in a process of its own.

It trains the benchmark's own tokens (the prompt, chosen and rejected ids of `bench/workload.py`'s pairs, in
loratune's training order), read sequentially, with the adapter switched off as the reference, as loratune does.
`trl_dpo` computes the reference log-probabilities in every step (TRL's default); `trl_dpo_pre` computes them once
before training (`precompute_ref_log_probs`), and that pass counts as training time.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import datasets
from trl import DPOConfig, DPOTrainer

from loratune.modeling.model import load_tokenizer

from .worker import optimizers, peft_model, train_timed, trainer_args


class _Tokenized(DPOTrainer):
    """DPOTrainer on rows already in its columns (prompt_ids, chosen_ids, rejected_ids), timing its precompute.

    TRL 1.16 tokenizes every row again, and its answers keep what the chat template writes after the end-of-turn
    token (ChatML's newline), a token per answer that loratune, and generation, never produce."""

    precompute_seconds = 0.0

    def _prepare_dataset(self, dataset, *args, **kwargs):
        return dataset

    def _precompute_ref_logps(self, *args, **kwargs):
        start = time.perf_counter()
        out = super()._precompute_ref_logps(*args, **kwargs)
        self.precompute_seconds += time.perf_counter() - start
        return out


class _PairCounter:
    """Counts pairs, their real tokens (both sequences: prompt + chosen and prompt + rejected) and the tokens the
    padded batches process."""

    def __init__(self, collate):
        self.collate, self.pairs, self.real, self.processed = collate, 0, 0, 0

    def __call__(self, features):
        self.pairs += len(features)
        self.real += sum(2 * len(f["prompt_ids"]) + len(f["chosen_ids"]) + len(f["rejected_ids"]) for f in features)
        batch = self.collate(features)
        self.processed += batch["input_ids"].numel()
        return batch


def run_trl_dpo(spec: dict) -> dict:
    precompute = spec["trainer"] == "trl_dpo_pre"
    tokenizer = load_tokenizer(spec["model_path"])
    model = peft_model(spec, "sdpa")
    data = datasets.Dataset.from_dict(json.loads(Path(spec["tokens"]).read_text()))
    # TRL's padding_free is switched off for DPO in 1.16 (it warns and pads), so it is not asked for.
    args = DPOConfig(
        **trainer_args(spec),
        beta=spec["beta"],
        loss_type=["sigmoid"],
        max_length=spec["max_length"],
        precompute_ref_log_probs=precompute,
        disable_dropout=True,
    )
    trainer = _Tokenized(
        model=model, args=args, train_dataset=data, processing_class=tokenizer, optimizers=optimizers(model, spec)
    )
    counter = _PairCounter(trainer.data_collator)  # after the precompute: only training's batches are counted
    trainer.data_collator = counter
    result = train_timed(trainer, spec)
    return result | {
        "seconds": result["seconds"] + trainer.precompute_seconds,
        "reference_seconds": trainer.precompute_seconds,
        "tokens": counter.real,
        "pairs": counter.pairs,
        "processed_tokens": counter.processed,
        "attention": "sdpa",
    }
