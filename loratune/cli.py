"""The `loratune` command: parses arguments, then calls the library. Every config field has a flag."""

from __future__ import annotations

import argparse
import gc
import operator
import sys

from .core.config import TrainConfig, parse_bytes
from .core.errors import BadRowError, UserError
from .core.presets import PRESETS, guide_warnings
from .core.sources import resolve
from .inference.export.formats import K_QUANTS, TYPES, check_type

FIELD_GROUPS = {
    "model": "Model",
    "train_data": "Data",
    "batch_size": "Training Guide: batch processing",
    "learning_rate": "Training Guide: learning",
    "lora_r": "Training Guide: LoRA",
    "lr_scheduler": "Optimizer and schedule",
    "precision": "Speed and memory",
    "eval_every_steps": "Evaluation, stopping and outputs",
}


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """A flag per TrainConfig field, with the field's description as help (values are validated by the config)."""
    parser.add_argument("config", nargs="?", help="YAML file of settings (flags override it)")
    parser.add_argument(
        "--preset",
        choices=list(PRESETS),
        help="start from an example configuration: "
        + " ".join(f"{name}: {p.description}" for name, p in PRESETS.items()),
    )
    group = parser
    for name, field in TrainConfig.model_fields.items():
        if name in FIELD_GROUPS:
            group = parser.add_argument_group(FIELD_GROUPS[name])
        flag = "--" + name.replace("_", "-")
        default = field.default_factory() if field.default_factory else field.default
        shown = " ".join(default) if isinstance(default, tuple) else default
        help_text = f"{field.description} (default: {shown})".replace("%", "%%")  # argparse formats help with %
        if field.annotation is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif isinstance(default, tuple):  # a list setting given by repeating its flag
            group.add_argument(flag, dest=name, metavar="VALUE", action="append", default=None, help=help_text)
        else:
            group.add_argument(flag, dest=name, metavar="VALUE", default=None, help=help_text)
        if name == "train_data":
            group.add_argument("--data", metavar="FILE", help="the same as --train-data")


BOOL_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}  # YAML's


def _bool_values(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """`--packing false` and `--packing=false` as `--no-packing` (and true as `--packing`), for every true/false
    setting: argparse's --flag/--no-flag take no value, so the word after one was read as the config file."""
    flags = {"--" + name.replace("_", "-") for name, f in TrainConfig.model_fields.items() if f.annotation is bool}
    out, i = [], 0
    while i < len(argv):
        flag, given, value = argv[i].partition("=")
        next_is_bool = argv[i + 1 : i + 2] != [] and argv[i + 1].lower() in BOOL_WORDS
        if "--" + flag[5:] in flags and flag.startswith("--no-") and (given or next_is_bool):
            parser.error(f"argument {flag}: takes no value; write --{flag[5:]} true or --{flag[5:]} false")
        if flag in flags and not given and next_is_bool:
            given, value, i = "=", argv[i + 1], i + 1
        if flag in flags and given:
            if value.lower() not in BOOL_WORDS:
                parser.error(f"argument {flag}: {value!r} is not one of {', '.join(BOOL_WORDS)}")
            out.append(flag if BOOL_WORDS[value.lower()] else "--no-" + flag[2:])
        else:
            out.append(argv[i])
        i += 1
    return out


def _ranged(kind, above=None, at_least=None, at_most=None):
    """An argparse type: `kind` within bounds, else argparse's one-line error saying what is allowed."""
    rules = [
        (test, bound, f"{sign} {bound}")
        for test, sign, bound in (
            (operator.gt, ">", above),
            (operator.ge, ">=", at_least),
            (operator.le, "<=", at_most),
        )
        if bound is not None
    ]

    def parse(text: str):
        value = kind(text)
        if not all(test(value, bound) for test, bound, _ in rules):
            raise argparse.ArgumentTypeError(f"{text}: must be " + " and ".join(words for _, _, words in rules))
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its "invalid int value" message
    return parse


def _flags(args: argparse.Namespace) -> dict:
    flags = {name: getattr(args, name) for name in TrainConfig.model_fields if getattr(args, name, None) is not None}
    if args.data is not None:
        if "train_data" in flags:  # one would silently win over the other
            raise UserError(
                f"--data {args.data} and --train-data {flags['train_data']} both give the training data: "
                "give one of them"
            )
        flags["train_data"] = args.data
    return flags


def _resolve(args: argparse.Namespace, default_preset: str | None = None):
    flags = _flags(args)
    preset = args.preset or (default_preset if not args.config else None)
    return resolve(args.config, preset, flags)


def cmd_train(args: argparse.Namespace) -> int:
    from .commands.train import train_command

    return train_command(args, _resolve)


def cmd_config_show(args: argparse.Namespace) -> int:
    resolved = _resolve(args)
    rows = [(name, str(value), resolved.sources[name]) for name, value in resolved.config.model_dump().items()]
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    print(f"# resolved config (preset {resolved.preset}); columns: setting, value, where it came from")
    for name, value, source in rows:
        print(f"{name:<{widths[0]}}  {value:<{widths[1]}}  {source}")
    for warning in guide_warnings(resolved.config):
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .commands.answers import generate_command

    return generate_command(args)


def cmd_eval(args: argparse.Namespace) -> int:
    from .commands.answers import eval_command

    return eval_command(args)


def cmd_pairs(args: argparse.Namespace) -> int:
    from .commands.pairs import pairs_command

    return pairs_command(args)


def cmd_chat(args: argparse.Namespace) -> int:
    from .inference.chat import chat

    chat(
        args.run_dir,
        adapter=args.adapter,
        system=args.system,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .training.report import write_report

    plot, report = write_report(args.run_dir)
    print(f"wrote {report}" + (f" and {plot}" if plot.is_file() else ""))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .inference.merge import merge

    out = merge(args.run_dir, args.out, adapter=args.adapter, dtype=args.dtype, overwrite=args.overwrite)
    print(f"merged model written to {out} (load it with AutoModelForCausalLM.from_pretrained)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    check_type(args.type, args.adapter_only)  # before the export's imports: a wrong --type is answered at once
    from .inference.export import export_gguf

    done = export_gguf(args.run_dir, args.out, args.type, args.adapter_only, args.overwrite, args.adapter)
    if not done.translated:
        print("note: the chat template has no Ollama translation; the Modelfile relies on the one in the GGUF")
    if not args.adapter_only:
        print(f"note: {K_QUANTS}")
    # Last: the line that says what came out (the UI shows an export's last line).
    print(f"wrote {done.path} ({done.size / 1e6:,.1f} MB, {args.type}) and its Ollama Modelfile {done.modelfile}")
    return 0


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from .commands.inspect import inspect, text, to_json

    cfg = _resolve(args).config
    ins, memory = inspect(cfg, args.percentile)
    print(to_json(ins, memory) if args.json else text(ins, memory, cfg))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    device = None
    if args.device and ":" in args.device:  # a device index (cuda:1) is the plan's, not a config value
        device, args.device = args.device, args.device.split(":")[0]
    resolved = _resolve(args)
    try:
        gpu_memory = None if args.gpu_memory is None else parse_bytes(args.gpu_memory)
    except ValueError as e:
        raise UserError(f"--gpu-memory {args.gpu_memory!r}: {e}") from None
    if args.tokens_per_second is not None and args.tokens_per_second <= 0:
        raise UserError(f"--tokens-per-second {args.tokens_per_second}: must be > 0")
    from .commands.plan import plan_run  # after the checks: it loads torch

    plan = plan_run(
        resolved.config,
        gpu_memory=gpu_memory,
        device=device or args.device,
        tokens_per_second=args.tokens_per_second,
        processes=args.num_processes,
        fsdp=args.fsdp,
        zero3=args.zero3,
    )
    print(plan.to_json() if args.json else plan.text())
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .ui.main import serve

    serve(Path(args.runs), host=args.host, port=args.port, token=args.token)
    return 0


class _Parser(argparse.ArgumentParser):
    """No abbreviated flags (subcommands inherit the class): argparse took `--lr 1e-3` as `--lr-scheduler 1e-3`
    and `--batch 4` as `--batch-size 4`, and a flag added later would change what an old command line means."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="loratune", description="Fine-tune causal language models with LoRA.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_train, _plan, _config, _generate, _eval, _pairs, _chat, _report, _merge, _export, _data, _sweep, _ui):
        add(commands)
    return parser


def _train(commands) -> None:
    p = commands.add_parser("train", help="fine-tune (with no arguments: the built-in quickstart)")
    _add_config_flags(p)
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        metavar="RUN_DIR",
        help="continue a run from its latest whole checkpoint (default: the config's output_dir)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in output_dir")
    p.add_argument(
        "--num-processes",
        type=_ranged(int, above=0),
        default=1,
        metavar="N",
        help="data-parallel processes on this machine (effective batch x N); for several machines or "
        "FSDP/DeepSpeed use `accelerate launch -m loratune train ...`",
    )
    p.set_defaults(func=cmd_train)


def _plan(commands) -> None:
    p = commands.add_parser("plan", help="estimate peak memory and time before training (loads no weights)")
    _add_config_flags(p)
    p.add_argument(
        "--gpu-memory",
        metavar="SIZE",
        help="plan for a CUDA GPU with this much memory, e.g. 24GB "
        "(default: the memory of --device, or of the device training would use)",
    )
    p.add_argument(
        "--tokens-per-second",
        type=float,
        metavar="N",
        help="training throughput for the time per epoch (default: a previous run's, else a quick benchmark)",
    )
    p.add_argument(
        "--num-processes",
        type=_ranged(int, above=0),
        default=1,
        metavar="N",
        help="plan one device of an N-process run: its share of each step (default: 1)",
    )
    sharded = p.add_mutually_exclusive_group()
    sharded.add_argument(
        "--fsdp",
        action="store_true",
        help="FSDP2 over the N processes: weights, gradients and optimizer state sharded (an accelerate FSDP config)",
    )
    sharded.add_argument(
        "--zero3",
        action="store_true",
        help="DeepSpeed ZeRO-3 over the N processes: the same sharded (an accelerate DeepSpeed config, zero_stage: 3)",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)


def _config(commands) -> None:
    config = commands.add_parser("config", help="inspect configuration")
    actions = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    p = actions.add_parser("show", help="print the resolved config and where each value came from")
    _add_config_flags(p)
    p.set_defaults(func=cmd_config_show)


def _run_dir(p, adapter: bool = True) -> None:
    inside = " (or an adapter/checkpoint in it)" if adapter else ""
    p.add_argument("run_dir", metavar="RUN_DIR", help=f"a training run's output_dir{inside}")
    if adapter:
        p.add_argument("--adapter", default="adapter", help="adapter (best, default), last, or a path")


def _sampling_flags(p) -> None:
    p.add_argument(
        "--max-new-tokens", type=_ranged(int, above=0), default=256, help="longest answer in tokens (default: 256)"
    )
    p.add_argument(
        "--temperature", type=_ranged(float, at_least=0), default=0.0, help="0 = greedy (default); > 0 samples"
    )
    p.add_argument(
        "--top-p", type=_ranged(float, above=0, at_most=1), default=1.0, help="nucleus sampling threshold when sampling"
    )


def _generate(commands) -> None:
    p = commands.add_parser("generate", help="generate with the base model plus a run's adapter")
    _run_dir(p)
    p.add_argument("--prompt", help="one prompt; the generated text is printed")
    p.add_argument(
        "--file",
        help="prompts, one per row (any training data shape; answers are ignored); prints one JSON object per line",
    )
    _sampling_flags(p)
    p.add_argument("--no-adapter", action="store_true", help="the base model alone, for comparison")
    p.set_defaults(func=cmd_generate)


def _eval(commands) -> None:
    p = commands.add_parser(
        "eval",
        help="loss and perplexity of base and fine-tuned model on a dataset (a preference run: its objective's "
        "loss, reward accuracy and margins on pairs)",
    )
    _run_dir(p)
    p.add_argument(
        "--data",
        required=True,
        help="examples with reference answers, in any training data shape (a preference run: pairs, or KTO rows)",
    )
    p.add_argument(
        "--generate",
        action="store_true",
        help="also generate answers (greedy) and score them against "
        "the references: exact match, word-overlap F1, JSON field accuracy",
    )
    p.add_argument(
        "--max-new-tokens",
        type=_ranged(int, above=0),
        help="longest generated answer (default: longest reference + 16)",
    )
    p.add_argument(
        "--batch-size", type=_ranged(int, above=0), help="examples per forward pass (default: the run's batch_size)"
    )
    p.add_argument(
        "--report",
        metavar="FILE",
        help="JSONL report: a summary line, then one line per example "
        "with --generate (default: RUN_DIR/eval-<data name>.jsonl)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object instead of a table")
    p.set_defaults(func=cmd_eval)


def _pairs(commands) -> None:
    p = commands.add_parser(
        "pairs",
        help="preference pairs from a run's mistakes: it answers a file's prompts (greedy), and each wrong answer "
        "becomes a pair, the reference chosen and the run's answer rejected, for DPO on top of it (--reference RUN)",
    )
    _run_dir(p)
    p.add_argument(
        "--data",
        metavar="FILE",
        help="rows with reference answers, in any SFT data shape (default: the run's own train_data)",
    )
    p.add_argument("--out", metavar="FILE", help="where the pairs go, one JSON row each (default: RUN_DIR/pairs.jsonl)")
    p.add_argument(
        "--max-new-tokens",
        type=_ranged(int, above=0),
        help="longest answer (default: longest reference + 16, as the held-out test)",
    )
    p.set_defaults(func=cmd_pairs)


def _chat(commands) -> None:
    p = commands.add_parser("chat", help="talk to the fine-tuned model (from a script: one message per input line)")
    _run_dir(p)
    p.add_argument("--system", help="a system message to start every conversation with")
    _sampling_flags(p)
    p.set_defaults(func=cmd_chat)


def _report(commands) -> None:
    p = commands.add_parser("report", help="write a run's loss.png and report.md (done at the end of training too)")
    _run_dir(p, adapter=False)
    p.set_defaults(func=cmd_report)


def _merge(commands) -> None:
    p = commands.add_parser("merge", help="merge base + adapter into one standard transformers model folder")
    _run_dir(p)
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the merged model to")
    p.add_argument(
        "--dtype",
        choices=["bf16", "fp16", "fp32"],
        help="number format of the merged weights (default: the base model's)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder at --out")
    p.set_defaults(func=cmd_merge)


def _export(commands) -> None:
    p = commands.add_parser("export", help="write the fine-tuned model as a GGUF file for llama.cpp and Ollama")
    _run_dir(p)
    p.add_argument("--format", required=True, choices=["gguf"], help="file format (gguf: llama.cpp, Ollama, LM Studio)")
    p.add_argument("--out", metavar="FILE", help="the .gguf file (default: RUN_DIR/<run name>[-adapter]-<type>.gguf)")
    p.add_argument(
        "--type",
        default="f16",
        metavar="TYPE",
        help=f"number format of the weights: {', '.join(TYPES)} (default: f16; an adapter: f16, bf16 or q8_0)",
    )
    p.add_argument(
        "--adapter-only",
        action="store_true",
        help="write the LoRA adapter alone, for `llama-cli -m BASE.gguf --lora FILE` and Ollama's ADAPTER line",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing file at --out")
    p.set_defaults(func=cmd_export)


def _data(commands) -> None:
    data = commands.add_parser("data", help="inspect training data")
    actions = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = actions.add_parser(
        "inspect", help="token lengths, what max_length truncates or drops, padding, and the max_length the data needs"
    )
    _add_config_flags(p)
    p.add_argument(
        "--percentile",
        type=float,
        default=99.0,
        help="recommend the max_length that keeps this %% of examples whole (default: 99)",
    )
    p.add_argument("--json", action="store_true", help="print the inspection as JSON")
    p.set_defaults(func=cmd_data_inspect)


def _sweep(commands) -> None:
    from .commands.sweep import add_parser

    add_parser(commands)


def _ui(commands) -> None:
    p = commands.add_parser("ui", help="a local web app to plan, start, watch, compare and try runs")
    p.add_argument(
        "--runs", default="runs", metavar="DIR", help="the runs folder it shows and starts runs in (default: runs)"
    )
    p.add_argument("--port", type=_ranged(int, at_least=0, at_most=65535), default=7860, help="port (default: 7860)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only); any other, e.g. 0.0.0.0, requires the "
        "token on every request",
    )
    p.add_argument(
        "--token",
        help="the token to require (default: LORATUNE_UI_TOKEN, else a random one printed in the address when "
        "--host is not loopback)",
    )
    p.set_defaults(func=cmd_ui)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_bool_values(sys.argv[1:] if argv is None else argv, parser))
    try:
        return args.func(args)
    except UserError as e:
        skippable = isinstance(e, BadRowError) and hasattr(args, "skip_bad_rows")  # only a flag this command has
        print(f"{e.label}: {e}" + (" (use --skip-bad-rows to skip such rows)" if skippable else ""), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("\nstopped.", file=sys.stderr)
        return 130


def run() -> None:
    """The `loratune` command as a process."""
    code = main()
    # The process ends here: skip the interpreter's last full garbage collection over every object torch and
    # transformers created, which delays the exit of a finished run by about a second.
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
