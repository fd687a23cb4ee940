"""`loratune eval`: a run's base and fine-tuned model side by side on a dataset."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from ..core.files import atomic_write
from ..modeling.evaluate import answer, dataset_loss, perplexity, score


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
    with `generate`, greedy answers scored against the references. Writes a JSONL report; returns its summary."""
    from ..core.errors import UserError
    from ..data.encode import Encoder
    from ..data.formats import prompt_text
    from ..data.prepare import DataReport, encode_source, fit, read_examples
    from ..modeling.attention import NAME as PACKED_ATTENTION
    from ..modeling.loss import CausalLMLoss
    from ..modeling.model import supports_packing
    from .run import load_run

    run = load_run(run_dir, adapter)
    cfg, encoder, tokenizer, model = run.config, run.encoder, run.tokenizer, run.model
    # Tokenized as training tokenized its data: same template and labels, same max_length and truncation.
    data_report = DataReport()
    full, _ = encode_source(data, "test", cfg, Encoder(tokenizer, encoder.template, cfg.train_on_inputs), data_report)
    text = data_report.data_format == "text"
    if generate and text:
        raise UserError(f"{data}: plain text has no prompts to answer, so --generate has nothing to score")
    tokenized, fitted = fit(full, cfg.max_length, cfg.truncation, split_long=text)
    if not len(tokenized):
        raise UserError(
            f"{data}: no example is left at max_length={cfg.max_length} with truncation="
            f"{cfg.truncation}, so there is no loss to measure"
        )
    lm = model.get_base_model()
    packing = cfg.packing and supports_packing(lm)
    if packing:
        lm.set_attn_implementation(PACKED_ATTENTION)
    batch_size = batch_size or (cfg.batch_size if isinstance(cfg.batch_size, int) else 8)
    loss_module, device = CausalLMLoss(model), next(model.parameters()).device
    models = {"base": model.disable_adapter, "fine_tuned": contextlib.nullcontext}
    summary = {
        "event": "summary",
        "data": str(data),
        "adapter": str(run.adapter),
        "examples": len(full),
        "scored_examples": len(tokenized),
        "dropped_too_long": fitted.dropped_too_long,
    }
    for name, use in models.items():
        with use():
            total, count = dataset_loss(loss_module, tokenized, batch_size, packing, tokenizer.pad_token_id, device)
        summary[name] = {"loss": total / count, "perplexity": perplexity(total / count)}
    summary["target_tokens"] = count  # the same for both models

    rows = []
    if generate:
        examples = read_examples(data, "test", cfg)
        outputs = {}
        for name, use in models.items():
            with use():
                outputs[name], references = answer(model, tokenizer, encoder, examples, max_new_tokens)
            summary[name].update(score(outputs[name], references))
        for i, ex in enumerate(examples):
            row = {"event": "example", "index": i, "prompt": prompt_text(ex), "reference": references[i]}
            per_model = {name: score([outputs[name][i]], [references[i]]) for name in models}
            row.update({name: outputs[name][i] for name in models})
            row.update({metric: {name: per_model[name][metric] for name in models} for metric in per_model["base"]})
            rows.append(row)

    report = Path(report) if report else run.run_dir / f"eval-{Path(data).stem}.jsonl"
    atomic_write(report, "".join(json.dumps(r) + "\n" for r in [summary, *rows]))
    summary["report"] = str(report)
    return summary
