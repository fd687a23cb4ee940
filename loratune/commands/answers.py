"""`loratune generate` and `loratune eval`: a finished run's answers, and its scores against the base model."""

from __future__ import annotations

import json

from ..core.errors import UserError

SHARES = ("exact_match", "overlap_f1", "field_accuracy", "reward_accuracy")  # printed as percentages


def generate_command(args) -> int:
    """Answers of a run to --prompt TEXT (printed) or to a JSONL file of prompts (one JSON line each)."""
    if (args.prompt is None) == (args.file is None):
        raise UserError("generate: give exactly one of --prompt TEXT or --file PROMPTS.jsonl")
    # After the check: a wrong command line is answered without loading torch.
    from ..data.formats import prompt_text
    from ..inference.run import load_run, prompt_examples, text_prompt
    from ..modeling.generate import generate_texts

    run = load_run(args.run_dir, adapter=args.adapter, use_adapter=not args.no_adapter)
    if args.prompt is not None:
        examples = [text_prompt(args.prompt, run.data_format)]
    else:
        examples = prompt_examples(args.file, run.data_format, run.config.columns)
    outputs = generate_texts(
        run.model,
        run.tokenizer,
        [run.encoder.prompt_ids(ex) for ex in examples],
        run.encoder.end_ids,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
    )
    for ex, text in zip(examples, outputs):
        print(text if args.prompt is not None else json.dumps({"prompt": prompt_text(ex), "generated": text}))
    return 0


def eval_command(args) -> int:
    """The base model and the fine-tuned one scored on a data file: a table, and the report's path."""
    from rich.console import Console
    from rich.table import Table

    from ..inference.evaluate import evaluate_run

    summary = evaluate_run(
        args.run_dir,
        args.data,
        report=args.report,
        adapter=args.adapter,
        generate=args.generate,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
    )
    if args.json:
        print(json.dumps(summary))
        return 0
    unit = summary.get("unit", "target tokens")
    if unit == "target tokens":
        print(f"{args.data}: {summary['scored_examples']} examples, {summary['target_tokens']:,} answer tokens")
    else:  # a preference run: its objective's loss over pairs (KTO: rows), the base being its reference
        print(f"{args.data}: {summary[unit]} {unit}, objective {summary['objective']} (base model: the reference)")
    table = Table()
    for column in ("", "base model", "fine-tuned"):
        table.add_column(column, justify="right" if column else "left")
    for metric in summary["fine_tuned"]:
        fmt = "{:.1%}" if metric in SHARES else "{:.2f}" if metric == "perplexity" else "{:.4f}"
        table.add_row(metric.replace("_", " "), *(fmt.format(summary[m][metric]) for m in ("base", "fine_tuned")))
    Console(highlight=False).print(table)
    if summary.get("truncated"):
        print(f"{summary['truncated']} {unit} had their prompt cut from the left to fit max_length")
    if summary["dropped_too_long"]:
        print(f"{summary['dropped_too_long']} {unit.replace('target tokens', 'examples')} longer than max_length were "
              "left out of the loss")  # fmt: skip
    print(f"report: {summary['report']}")
    return 0
