"""The run's configuration: one typed model, its presets, where each value came from, and the Guide's advice.

Sources, later wins: field defaults < preset < YAML file < command-line flags.
The nine Training Guide parameters keep the Guide's names and defaults exactly.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import UserError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DATA_FORMATS = ("auto", "input_output", "alpaca", "prompt_completion", "messages", "sharegpt", "text")


class TrainConfig(BaseModel):
    """Everything a run needs. Each field's description is its help text in `--help` and the docs."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)

    # --- Model -------------------------------------------------------------------------------------
    model: str = Field(
        "smollm2-135m",
        description="Base model: a built-in short name (smollm2-135m), a local folder, a .gguf file, or a hub id.",
    )

    # --- Data --------------------------------------------------------------------------------------
    train_data: str | None = Field(
        None,
        description="Training examples: a .jsonl/.json/.csv/.tsv/.parquet file, a folder of them, or a hub dataset "
        "org/name[:subset][@split] (split default: train; validation for val_data, test for test_data).",
    )
    val_data: str | None = Field(
        None, description="Validation examples; when absent, val_ratio of train_data is held out."
    )
    test_data: str | None = Field(
        None,
        description="Held-out examples scored by greedy generation before and after training "
        "(exact match, field accuracy).",
    )
    val_ratio: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="Share of train_data held out for validation when val_data is absent (at least 1 example).",
    )
    data_format: Literal[DATA_FORMATS] = Field(  # type: ignore[valid-type]
        "auto", description="Shape of the examples; auto detects it from the columns."
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Map our column names to yours, e.g. {input: question, output: answer}. "
        "Flag form: input=question,output=answer.",
    )
    chat_template: str | None = Field(
        None,
        description="Chat template: the model's own when absent (plain for models without one); a built-in name "
        "(chatml, plain, alpaca) or a .jinja file.",
    )
    train_on_inputs: bool = Field(False, description="Also train on prompt tokens (default: loss on the answers only).")
    truncation: Literal["truncate_prompt_left", "truncate_end", "drop"] = Field(
        "truncate_prompt_left",
        description="What to do with examples longer than max_length: cut the prompt's start (keeps the answer and its "
        "end token whole), cut the end, or drop the example.",
    )
    skip_bad_rows: bool = Field(False, description="Skip malformed rows (and report how many) instead of stopping.")

    # --- Training Guide: batch processing ------------------------------------------------------------
    batch_size: Annotated[int, Field(gt=0)] | Literal["auto"] = Field(
        8,
        description="Number of samples processed together (per forward pass; with packing, a pass holds up to this "
        "many times the longest example's tokens). "
        "Higher = faster training, more memory. 'auto' picks the largest that fits. Guide range: 4-16.",
    )
    gradient_accumulation_steps: int = Field(
        8,
        gt=0,
        description="Number of forward passes before updating weights (with packing, at most: full passes may take "
        "fewer). Effective batch = batch_size x this. "
        "Guide range: 4-32.",
    )
    max_length: int = Field(
        1024,
        ge=8,
        description="Maximum sequence length (tokens) of an example. Longer = more memory; use the minimum your data "
        "needs (see `loratune data inspect`).",
    )

    # --- Training Guide: learning --------------------------------------------------------------------
    learning_rate: float = Field(2e-4, gt=0, description="Step size for model updates. Guide range: 5e-5 to 2e-4.")
    epochs: int = Field(
        20, gt=0, description="Complete passes through the dataset; early stopping on validation loss ends sooner."
    )
    warmup_ratio: float = Field(
        0.05, ge=0, le=1, description="Portion of training spent increasing the learning rate. Guide range: 0.03-0.1."
    )

    # --- Training Guide: LoRA ------------------------------------------------------------------------
    lora_r: int = Field(8, gt=0, description="Rank of the LoRA adaptations. Guide range: 8-32.")
    lora_alpha: int = Field(32, gt=0, description="Scaling factor for LoRA updates; usually 2x-4x lora_r.")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout probability in the LoRA layers.")
    lora_target_modules: Annotated[list[str], Field(min_length=1)] | Literal["all-linear"] = Field(
        "all-linear",
        description="Layers that get LoRA adapters: all-linear (every linear layer of the blocks) or names, "
        "e.g. q_proj,v_proj.",
    )

    # --- Optimizer and schedule ----------------------------------------------------------------------
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Learning-rate schedule after the linear warmup."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on the LoRA weights.")
    max_grad_norm: float = Field(1.0, ge=0, description="Clip the gradient norm to this (0 turns clipping off).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps (a cap on epochs).")
    seed: int = Field(42, ge=0, description="Seed for data order, splits, LoRA initialisation and dropout.")

    # --- Speed and memory ----------------------------------------------------------------------------
    precision: Literal[PRECISIONS] = Field(  # type: ignore[valid-type]
        "auto",
        description="Number format of the frozen base: auto picks bf16/fp16 where the hardware runs it fast, "
        "else fp32. "
        "LoRA weights, gradients and optimizer state stay fp32.",
    )
    packing: bool = Field(
        True,
        description="Pack examples into rows with attention kept inside each example: no padding, same loss.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: much less memory, about 30% slower."
    )
    max_memory: str | None = Field(
        None,
        description="Memory cap for training, e.g. 6GB: the run plans and recovers as if the device had this much.",
    )
    load_in_4bit: bool = Field(False, description="Load the base in 4-bit NF4 (QLoRA; CUDA with bitsandbytes only).")
    torch_compile: bool = Field(
        False,
        description="Compile the decoder layers with torch.compile: often faster steps on GPUs, after a minute or more "
        "of compiling; on CPUs it rarely pays and needs a C++ compiler.",
    )
    liger_kernels: bool = Field(
        False,
        description="Liger's fused Triton kernels for RMSNorm, RoPE and SwiGLU: less time and memory (CUDA only; "
        "pip install liger-kernel; the model families Liger supports).",
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="Where to train; auto prefers a GPU.")

    # --- Evaluation, stopping, outputs ---------------------------------------------------------------
    eval_every_steps: int | None = Field(
        None, gt=0, description="Measure validation loss every this many optimizer steps (default: once per epoch)."
    )
    early_stopping_patience: int = Field(
        3, ge=0, description="Stop after this many evaluations without improvement (0 turns early stopping off)."
    )
    early_stopping_min_delta: float = Field(
        0.001, ge=0, description="Smallest drop in validation loss that counts as an improvement."
    )
    output_dir: str | None = Field(None, description="Where the run writes its outputs (default: runs/<config name>).")
    save_every_steps: int | None = Field(
        None,
        gt=0,
        description="Also checkpoint every this many optimizer steps (checkpoints are always written at evaluations).",
    )
    keep_checkpoints: int = Field(2, ge=1, description="How many recent checkpoints to keep (the best is always kept).")
    max_nonfinite_steps: int = Field(
        5, ge=1, description="Stop after this many updates in a row with a NaN or infinite loss or gradient."
    )
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list, description="Experiment trackers to log to (metrics.jsonl is always written)."
    )

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_other_types(cls, v, info):
        # pydantic reads YAML's true/false as 1/0 where a number is expected (bool is an int in Python)
        if isinstance(v, bool) and cls.model_fields[info.field_name].annotation is not bool:
            raise ValueError(f"must be {allowed(info.field_name)}")
        return v

    @field_validator("lora_target_modules", mode="before")
    @classmethod
    def _split_modules(cls, v):
        return _split_list(v) if isinstance(v, str) and v != "all-linear" else v

    @field_validator("report_to", mode="before")
    @classmethod
    def _split_trackers(cls, v):
        return _split_list(v) if isinstance(v, str) else v

    @field_validator("columns", mode="before")
    @classmethod
    def _parse_columns(cls, v):
        if isinstance(v, str):  # flag form: input=question,output=answer
            pairs = [p.split("=", 1) for p in _split_list(v)]
            if any(len(p) != 2 for p in pairs):
                raise ValueError("expected ours=yours pairs separated by commas")
            return {k.strip(): val.strip() for k, val in pairs}
        return v

    @field_validator("max_memory")
    @classmethod
    def _check_memory(cls, v):
        if v is not None:
            parse_bytes(v)
        return v

    @field_validator("columns")
    @classmethod
    def _check_roles(cls, v):
        unknown = sorted(set(v) - set(COLUMN_ROLES))
        if unknown:
            raise ValueError(f"unknown role {unknown[0]!r}; roles are {', '.join(COLUMN_ROLES)}")
        return v


# The roles a data column can play; `columns` maps these to the user's names.
COLUMN_ROLES = ("input", "output", "instruction", "prompt", "completion", "messages", "conversations", "text", "system")

GUIDE_FIELDS = (
    "batch_size",
    "gradient_accumulation_steps",
    "max_length",
    "learning_rate",
    "epochs",
    "warmup_ratio",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
)


def _split_list(value: str) -> list[str]:
    return [p.strip() for p in value.split(",") if p.strip()]


def parse_bytes(text: str) -> int:
    """'6GB' / '512MiB' / '1.5g' -> bytes (GB and GiB both mean 2**30, as users mean them)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", str(text), re.IGNORECASE)
    if m:
        number, unit = float(m.group(1)), m.group(2).lower()
        size = int(number * 1024 ** ("kmgt".index(unit) + 1 if unit else 0))
    if not m or size <= 0:  # 0 would plan for no memory at all
        raise ValueError("expected a size above 0 such as 6GB or 512MB")
    return size


# --- Presets (the Guide's "Example Configurations") --------------------------------------------------


class Preset(BaseModel):
    description: str
    values: dict[str, Any]


def _quickstart_data(split: str) -> str:
    return str(Path(__file__).parents[1] / "quickstart" / "data" / f"{split}.jsonl")


PRESETS: dict[str, Preset] = {
    "balanced": Preset(
        description="The Training Guide's Balanced Training defaults. Use it first, on any data.",
        values={},
    ),
    "quick": Preset(
        description="A check that the whole pipeline works on your data and model: 10 small steps, "
        "validation at the end. Use it before a long run.",
        values={"batch_size": 4, "gradient_accumulation_steps": 4, "epochs": 1, "max_steps": 10},
    ),
    "memory_saver": Preset(
        description="Same effective batch (64) in smaller forward passes with activations recomputed. "
        "Use it when the plan says the run does not fit, or on a small GPU.",
        values={"batch_size": 4, "gradient_accumulation_steps": 16, "gradient_checkpointing": True},
    ),
    "high_capacity": Preset(
        description="Rank 32 adapters at a gentler learning rate. Use it for complex tasks or large datasets "
        "where the balanced adapter underfits (validation loss still falling at the end).",
        values={"lora_r": 32, "lora_alpha": 64, "learning_rate": 1e-4},
    ),
    "quickstart": Preset(
        description="The built-in demo: SmolLM2-135M-Instruct learns to turn order messages into JSON records, "
        "on the CPU in minutes. `loratune train` with no arguments runs it.",
        values={
            "model": "smollm2-135m",
            "train_data": _quickstart_data("train"),
            "val_data": _quickstart_data("val"),
            "test_data": _quickstart_data("test"),
            "batch_size": 4,
            "gradient_accumulation_steps": 4,
            "max_length": 256,
            "epochs": 2,
            "learning_rate": 2e-4,
            "output_dir": "runs/quickstart",
        },
    ),
}
DEFAULT_PRESET = "balanced"


# --- The Training Guide's recommended ranges become warnings ----------------------------------------


def guide_warnings(cfg: TrainConfig) -> list[str]:
    """Values outside the Guide's recommended ranges, each with the Guide's own advice. Training goes on."""
    out = []

    def check(name, value, lo, hi, shown, advice):
        if value is not None and not isinstance(value, str) and not (lo <= value <= hi):
            out.append(f"{name}={value:g} is outside the Training Guide's recommended range {shown}: {advice}")

    check(
        "batch_size",
        cfg.batch_size,
        4,
        16,
        "4-16",
        '"Higher values = faster training, more memory. Lower values = slower training, less memory."',
    )
    check(
        "gradient_accumulation_steps",
        cfg.gradient_accumulation_steps,
        4,
        32,
        "4-32",
        '"Lower values = faster training, more memory usage."',
    )
    check(
        "learning_rate",
        cfg.learning_rate,
        5e-5,
        2e-4,
        "5e-5 to 2e-4",
        '"Higher values = faster learning but risk instability. Lower values = more stable but slower training."',
    )
    check(
        "warmup_ratio",
        cfg.warmup_ratio,
        0.03,
        0.1,
        "0.03-0.1",
        '"Higher values = more stable start but slower training. '
        'Lower values = faster training but might be unstable."',
    )
    check(
        "lora_r",
        cfg.lora_r,
        8,
        32,
        "8-32",
        '"Higher values = more capacity but larger adapter. Lower values = smaller adapter but limited capacity."',
    )
    if not 2 * cfg.lora_r <= cfg.lora_alpha <= 4 * cfg.lora_r:
        out.append(
            f"lora_alpha={cfg.lora_alpha} is not 2x-4x lora_r={cfg.lora_r} as the Training Guide advises: "
            '"Usually set to 2x-4x of lora_r. Higher values = stronger adaptation effect. '
            'Lower values = more conservative changes."'
        )
    return out


# --- Resolving sources into one config --------------------------------------------------------------


class Resolved(BaseModel):
    """A validated config and, for every field, where its value came from."""

    config: TrainConfig
    sources: dict[str, str]
    preset: str
    name: str  # used for the default output_dir


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys without a word; YAML forbids them, and a setting given twice is
    a mistake to point at."""

    def construct_mapping(self, node, deep=False):
        lines = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):  # SafeLoader refuses it below, with its own message
                continue
            if key in lines:
                raise yaml.constructor.ConstructorError(
                    problem=f"{key} is given twice, on lines {lines[key]} and {key_node.start_mark.line + 1}",
                    problem_mark=key_node.start_mark,
                )
            lines[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {path}: not found")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"config file {path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    except UnicodeDecodeError:
        raise UserError(f"config file {path}: not UTF-8 text (a YAML file of field: value lines is expected)") from None
    except OSError as e:
        raise UserError(f"config file {path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path}: expected a mapping of field: value, got {type(data).__name__}")
    if bad := [key for key in data if not isinstance(key, str)]:
        raise UserError(f"config file {path}: {bad[0]!r} is not a setting name (`loratune config show` lists them)")
    return data


PATH_FIELDS = ("train_data", "val_data", "test_data", "chat_template")


def resolve(
    config_file: str | None = None,
    preset: str | None = None,
    flags: dict[str, Any] | None = None,
) -> Resolved:
    """Layer defaults < preset < YAML < flags, validate once, and remember each value's source.

    `flags` maps field names to raw command-line strings (or Python values from the API).
    """
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    file_values: dict[str, Any] = {}
    if config_file:
        file_values = read_yaml(config_file)
        base = Path(config_file).resolve().parent
        # Relative paths in a config file are relative to that file, so configs can travel with their data.
        for key in PATH_FIELDS:
            v = file_values.get(key)
            if isinstance(v, str) and not Path(v).is_absolute() and (base / v).exists():
                file_values[key] = str(base / v)

    preset_name = preset or file_values.pop("preset", None) or DEFAULT_PRESET
    file_values.pop("preset", None)
    if preset_name not in PRESETS:
        raise UserError(f"preset = {preset_name!r}: unknown; allowed: {', '.join(PRESETS)}")

    layers = [
        (f"preset {preset_name}", PRESETS[preset_name].values),
        (str(config_file), file_values),
        ("command line", flags),
    ]
    merged: dict[str, Any] = {}
    sources = {name: "default" for name in TrainConfig.model_fields}
    for source, values in layers:
        for key, value in values.items():
            merged[key] = value
            sources[key] = source if source != "command line" else f"--{key.replace('_', '-')}"

    try:
        cfg = TrainConfig(**merged)
    except ValidationError as e:
        raise UserError(_explain(e, merged, sources)) from None

    name = Path(config_file).stem if config_file else preset_name if preset_name != DEFAULT_PRESET else "run"
    if cfg.output_dir is None:
        cfg.output_dir = str(Path("runs") / name)
        sources["output_dir"] = "derived from the config name"
    _check_paths(cfg, sources)
    return Resolved(config=cfg, sources=sources, preset=preset_name, name=name)


def _check_paths(cfg: TrainConfig, sources: dict[str, str]) -> None:
    for key in PATH_FIELDS:
        value = getattr(cfg, key)
        if value is None or Path(value).exists() or key == "chat_template" and "/" not in value and "." not in value:
            continue
        if key != "chat_template" and _looks_like_hub_id(value):
            continue  # a hub dataset, loaded when the network allows
        raise UserError(f"{key} = {value!r} (from {sources[key]}): file not found")


def _looks_like_hub_id(value: str) -> bool:
    """org/name, optionally :subset and @split (a split may be sliced: train[:90%])."""
    m = re.fullmatch(r"([\w.-]+/[\w.-]+)(:[\w.-]+)?(@[\w.:%\[\]+-]+)?", value)
    return bool(m) and not Path(m.group(1)).suffix


def _explain(error: ValidationError, values: dict[str, Any], sources: dict[str, str]) -> str:
    """One line: the field, its value, where it came from, and what is allowed."""
    err = error.errors()[0]
    field = str(err["loc"][0]) if err["loc"] else ""
    if err["type"] == "extra_forbidden":
        close = _closest(field, TrainConfig.model_fields)
        hint = f"; did you mean {close}?" if close else ""
        return f"unknown setting {field!r} (from {sources.get(field, 'config')}){hint}"
    if not field:
        return f"config: {err['msg']}"
    value = values.get(field, err.get("input"))
    where = f"{field} = {value!r} (from {sources.get(field, 'config')})"
    if err["type"] == "value_error":  # our own validators say precisely what is wrong
        return f"{where}: {err['ctx']['error']}"
    return f"{where}: must be {allowed(field)}"


def allowed(field: str) -> str:
    """Plain-words description of a field's valid values, derived from its type and constraints."""
    info = TrainConfig.model_fields[field]
    return _describe(info.annotation, info.metadata)


def _describe(annotation, metadata=()) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        inner = args[0]
        extra = [m for a in args[1:] for m in getattr(a, "metadata", [a])]
        return _describe(inner, [*metadata, *extra])
    if origin is Literal:
        return str(args[0]) if len(args) == 1 else "one of: " + ", ".join(str(a) for a in args)
    if origin in (Union, UnionType):
        parts = [_describe(a, metadata) for a in args if a is not type(None)]
        return " or ".join(parts) + (" (or unset)" if type(None) in args else "")
    simple = {int: "an integer", float: "a number", bool: "true or false", str: "text"}
    if annotation in simple:
        bounds = [
            f"{sym} {getattr(m, attr):g}"
            for m in metadata
            for attr, sym in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
            if isinstance(m, getattr(annotated_types, attr.capitalize()))
        ]
        return " ".join([simple[annotation], " and ".join(bounds)]).strip()
    if origin is list:
        item = f" of {_describe(args[0])}" if get_origin(args[0]) is Literal else ""
        at_least = any(getattr(m, "min_length", 0) for m in metadata)
        return f"a{' non-empty' if at_least else ''} list{item} (YAML list or comma-separated names)"
    if origin is dict:
        return "a mapping (YAML mapping or key=value pairs separated by commas)"
    return str(annotation)


def _closest(name: str, choices) -> str | None:
    import difflib

    found = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return found[0] if found else None


def dump_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def read_run_config(run_dir: str | Path) -> TrainConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir}: not a loratune run folder (no config.yaml)")
    return TrainConfig(**yaml.safe_load(path.read_text()))
