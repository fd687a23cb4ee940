"""Loading a finished run for inference: the base model, its adapter, and the training-time prompt format."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.config import TrainConfig
from ..core.device import choose_dtype
from ..core.errors import UserError
from ..core.sources import read_run_config
from ..data.encode import Encoder
from ..data.formats import SHAPES, Example, RowError, to_example
from ..modeling.adapter import quiet_peft
from ..modeling.model import generation_end_ids, load_model, load_tokenizer, resolve_model
from ..modeling.reference import with_reference

# Data shapes whose prompts are raw text: no chat template, no conversation.
PLAIN_FORMATS = ("prompt_completion", "text")


@dataclass
class LoadedRun:
    model: torch.nn.Module  # base + adapter (PeftModel), or the base alone
    tokenizer: object
    encoder: Encoder
    config: TrainConfig
    data_format: str
    run_dir: Path
    adapter: Path  # the adapter folder used

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def locate_run(path: str | Path, adapter: str = "adapter") -> tuple[Path, Path]:
    """(run folder, adapter folder) for a run folder, or for an adapter or checkpoint folder inside a run."""
    path = Path(path)
    root = next((p for p in (path, *path.parents) if (p / "config.yaml").is_file()), None)
    if root is None:
        raise UserError(f"{path}: not a loratune run folder (no config.yaml here or above it)")
    return root, adapter_path(root, adapter if root == path else str(path.resolve()))


def adapter_path(run_dir: str | Path, adapter: str = "adapter") -> Path:
    """`adapter` (best), `last`, or a path to any adapter folder (e.g. a checkpoint's adapter/)."""
    path = Path(adapter) if Path(adapter).is_absolute() or "/" in adapter else Path(run_dir) / adapter
    if (path / "adapter").is_dir() and not (path / "adapter_config.json").is_file():
        path = path / "adapter"  # a checkpoint folder
    if not (path / "adapter_config.json").is_file():
        raise UserError(f"{path}: no adapter here (expected adapter_config.json)")
    return path


def load_run(
    run_dir: str | Path, adapter: str = "adapter", use_adapter: bool = True, device: str | None = None
) -> LoadedRun:
    from peft import PeftModel

    run_dir, folder = locate_run(run_dir, adapter)
    cfg = read_run_config(run_dir)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(str(folder))  # saved with the adapter: the chat template used in training
    try:  # the number format the run trained in, so that eval reproduces its validation loss
        dtype = choose_dtype(cfg.precision, device)
    except UserError:  # one this device lacks (fp16 off CUDA)
        dtype = choose_dtype("auto", device)
    base = with_reference(load_model(model_path, dtype, device), cfg)
    with quiet_peft():
        model = PeftModel.from_pretrained(base, folder) if use_adapter else base
    model.eval()
    encoder = Encoder(tokenizer, tokenizer.chat_template, cfg.train_on_inputs, end_ids=generation_end_ids(base))
    data_format = trained_format(run_dir, cfg)
    return LoadedRun(model, tokenizer, encoder, cfg, data_format, run_dir, folder)


def run_end_ids(tokenizer, model) -> set[int]:
    """Where generation from a trained run stops: the end tokens training taught (end of sequence, the chat
    template's end of turn; the tokenizer saved with the adapter carries that template) and the model's own."""
    return Encoder(tokenizer, tokenizer.chat_template, end_ids=generation_end_ids(model)).end_ids


def trained_format(run_dir, cfg: TrainConfig) -> str:
    """The data shape the run trained on (detected at training time and recorded in data.json); for preference data,
    the shape its prompts were formatted as."""
    record = Path(run_dir) / "data.json"
    if record.is_file():
        found = json.loads(record.read_text())
        return found.get("prompt_format") or found.get("data_format") or cfg.data_format
    return cfg.data_format


def prompt_examples(path: str, data_format: str, columns: dict[str, str]) -> list[Example]:
    """The prompts of a file's rows (any shape the run could train on; answers may be absent), formatted as in
    training."""
    from ..data.load import BadRows, read_rows

    examples = []
    for where, row in read_rows(path, BadRows(skip=False)):
        try:
            examples.append(prompt_example(row, data_format, columns))
        except RowError as e:
            raise UserError(f"{where}: {e}") from None
    if not examples:
        raise UserError(f"{path}: no rows (the file or folder is empty; give one prompt per row)")
    return examples


def prompt_example(row: dict, data_format: str, columns: dict[str, str]) -> Example:
    """A row that may lack its answer, as an Example whose prompt is formatted as in training."""
    fmt = data_format if data_format != "auto" else _detect_prompt_shape(row, columns)
    if fmt == "messages" and "messages" not in row:
        row = _preference_prompt(row)
    prompt = columns.get(SHAPES[fmt][0], SHAPES[fmt][0])  # the column holding the prompt in every shape
    if prompt not in row:
        raise RowError(
            f"no {prompt!r} field, which holds the prompt of this run's {fmt} rows (fields here: "
            f"{', '.join(sorted(row)) or 'none'})"
        )
    row = dict(row)
    answer = {"input_output": "output", "alpaca": "output", "prompt_completion": "completion"}.get(fmt)
    if answer:
        row.setdefault(columns.get(answer, answer), "")
    if fmt in ("messages", "sharegpt"):
        turns = list(row[prompt] or [])
        turns.append({"role": "assistant", "content": ""} if fmt == "messages" else {"from": "gpt", "value": ""})
        row[prompt] = turns
    example = to_example(row, fmt, columns)
    return Example(prompt=example.completion) if fmt == "text" else example  # plain text: all of it is the prompt


def _preference_prompt(row: dict) -> dict:
    """A preference row of turns (a pair or a KTO row) as a `messages` row of its prompt: its `prompt` turns, or,
    without them, the conversation a pair's chosen answer ends, up to that answer."""
    prompt, chosen = row.get("prompt"), row.get("chosen")
    if isinstance(prompt, list):
        return {"messages": prompt}
    return {"messages": chosen[:-1]} if isinstance(chosen, list) and chosen else row


def _detect_prompt_shape(row: dict, columns: dict[str, str]) -> str:
    prompts = {fmt: columns.get(needed[0], needed[0]) for fmt, needed in SHAPES.items()}
    for fmt, column in prompts.items():
        if column in row:
            return fmt
    raise RowError(
        f"no prompt field among {', '.join(sorted(row)) or 'none'}; expected one of {', '.join(prompts.values())}"
    )


def text_prompt(text: str, data_format: str) -> Example:
    """A bare prompt string, wrapped the way the run's training data was."""
    if data_format in PLAIN_FORMATS:
        return Example(prompt=text)
    return Example(messages=[{"role": "user", "content": text}, {"role": "assistant", "content": ""}])
