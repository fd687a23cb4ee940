"""The run's configuration: one typed model, each field with its help text (what `--help`, the docs and the UI show).

The nine Training Guide parameters keep the Guide's names and defaults exactly. Presets and the Guide's ranges:
core.presets; merging defaults, preset, YAML file and flags: core.sources.
"""

from __future__ import annotations

import re
from types import UnionType
from typing import Annotated, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .reward_spec import parse_reward

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DATA_FORMATS = ("auto", "input_output", "alpaca", "prompt_completion", "messages", "sharegpt", "text")
OBJECTIVES = ("sft", "dpo", "orpo", "simpo", "kto", "grpo")
LORA_INITS = ("kaiming", "gaussian", "pissa", "pissa_fast", "olora")
# Initialisations that move part of the base weight into the adapter: "adapter off" is no longer the base.
BASE_CHANGING_INITS = ("pissa", "pissa_fast", "olora")
# Each objective's own settings: one set for another objective is refused (it would silently do nothing).
OBJECTIVE_SETTINGS = {
    "beta": ("dpo", "kto"),
    "dpo_loss": ("dpo",),
    "orpo_lambda": ("orpo",),
    "simpo_beta": ("simpo",),
    "simpo_gamma": ("simpo",),
    "desirable_weight": ("kto",),
    "undesirable_weight": ("kto",),
    "reference": ("dpo", "orpo", "simpo", "kto"),
    # GRPO
    "num_generations": ("grpo",),
    "temperature": ("grpo",),
    "top_p": ("grpo",),
    "max_new_tokens": ("grpo",),
    "grpo_beta": ("grpo",),
    "epsilon": ("grpo",),
    "grpo_loss": ("grpo",),
    "updates_per_generation": ("grpo",),
    "reward": ("grpo",),
}


class TrainConfig(BaseModel):
    """Everything a run needs. Each field's description is its help text in `--help` and the docs."""

    # frozen: what the user asked for is never changed; what a run resolves is its own object (training.resolved)
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=(), allow_inf_nan=False)

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
        "many times the longest example's tokens; grpo: prompts per pass, each with num_generations sampled "
        "answers). "
        "Higher = faster training, more memory. 'auto' picks the largest that fits. Guide range: 4-16.",
    )
    gradient_accumulation_steps: int = Field(
        8,
        gt=0,
        description="Number of forward passes before updating weights (with packing, at most: full passes may take "
        "fewer). Effective batch = batch_size x this (grpo: prompts per optimizer step). "
        "Guide range: 4-32.",
    )
    max_length: int = Field(
        1024,
        ge=8,
        description="Maximum sequence length (tokens) of an example. Longer = more memory; use the minimum your data "
        "needs (see `loratune data inspect`). grpo: bounds prompt + max_new_tokens (prompts cut from the left).",
    )

    # --- Training Guide: learning --------------------------------------------------------------------
    learning_rate: float = Field(2e-4, gt=0, description="Step size for model updates. Guide range: 5e-5 to 2e-4.")
    epochs: int = Field(
        20,
        gt=0,
        description="Complete passes through the dataset; early stopping on validation loss ends sooner (grpo: "
        "through the prompts; validation loss is minus the mean reward of greedy answers).",
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

    # --- LoRA variants (PEFT's) -----------------------------------------------------------------------
    use_rslora: bool = Field(
        False,
        description="rsLoRA: scale the update by lora_alpha/sqrt(lora_r) instead of lora_alpha/lora_r, so higher "
        "ranks are not damped; the Guide's 2x-4x lora_r advice then reads alpha = 2x-4x sqrt(lora_r).",
    )
    use_dora: bool = Field(
        False,
        description="DoRA: train each adapted weight's magnitude (one number per output) apart from its direction; "
        "runs PEFT's LoRA layer (slower), and exports to GGUF or vLLM only as the merged model.",
    )
    lora_init: Literal[LORA_INITS] = Field(  # type: ignore[valid-type]
        "kaiming",
        description="Initial adapter: kaiming (PEFT's default: A random, B zero), gaussian (A normal), pissa (A, B "
        "from the weight's top singular vectors, the base keeps the rest), pissa_fast (the same by a fast "
        "randomised SVD, for large models), olora (from a QR decomposition). pissa and olora change the base: "
        "the saved adapter is converted to plain LoRA of rank 2 x lora_r against the original base.",
    )
    loraplus_lr_ratio: float = Field(
        1.0,
        ge=1,
        description="LoRA+: lora_B learns at this many times learning_rate (lora_A at learning_rate); 1 is plain "
        "LoRA, the LoRA+ paper suggests 16.",
    )
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Layers trained whole beside the adapters and saved with them, e.g. embed_tokens,lm_head "
        "(after adding tokens); a full copy each, with its AdamW state, in the base's number format.",
    )

    # --- Objective ---------------------------------------------------------------------------------
    objective: Literal[OBJECTIVES] = Field(  # type: ignore[valid-type]
        "sft",
        description="What the run trains for: sft (answers' cross-entropy), dpo (pairs against the base as "
        "reference; dpo_loss sigmoid or ipo), orpo and simpo (pairs, no reference), kto (answers labelled "
        "desirable or not), grpo (groups of sampled answers scored by reward functions). Preference data: "
        "prompt/chosen/rejected rows, or prompt/completion/label for kto; grpo: prompt rows, or any SFT shape whose "
        "answer becomes the reference.",
    )
    beta: float = Field(
        0.1,
        gt=0,
        description="dpo and kto: how far the adapter may move from the reference (the base without it); lower "
        "= further.",
    )
    dpo_loss: Literal["sigmoid", "ipo"] = Field(
        "sigmoid", description="dpo: the loss of the pair's log-ratio margin, sigmoid (DPO) or ipo (squared, IPO)."
    )
    orpo_lambda: float = Field(
        0.1, ge=0, description="orpo: weight of the odds-ratio term beside the chosen answer's cross-entropy."
    )
    simpo_beta: float = Field(
        2.0, gt=0, description="simpo: scale of the margin of mean log-probabilities (its own scale, not beta's)."
    )
    simpo_gamma: float = Field(0.5, ge=0, description="simpo: the margin the chosen answer must win by.")
    desirable_weight: float = Field(1.0, gt=0, description="kto: weight of the loss of desirable answers.")
    undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of the loss of undesirable answers.")
    reference: str | None = Field(
        None,
        description="dpo, orpo, simpo, kto: a finished run folder (an SFT run) to train on top of: its adapter is "
        "merged into the base, a fresh adapter trains, and the merged model is the reference. The result loads on "
        "that run's merged model, or as an adapter stacked on its adapter (docs/preference.md).",
    )
    # GRPO: each prompt's num_generations answers sampled with the current adapter, their rewards normalised within
    # the group (modeling.grpo)
    num_generations: int = Field(
        8, ge=2, description="grpo: answers sampled per prompt (the group whose rewards are compared)."
    )
    temperature: float = Field(
        1.0, gt=0, description="grpo: sampling temperature of the answers (the loss scores their tokens at it too)."
    )
    top_p: float = Field(1.0, gt=0, le=1, description="grpo: nucleus sampling, the probability mass sampled from.")
    max_new_tokens: int = Field(
        256, gt=0, description="grpo: most tokens of a sampled answer (an answer ends earlier at end of turn)."
    )
    grpo_beta: float = Field(
        0.04,
        ge=0,
        validate_default=True,  # the default also asks for the reference, which lora_init pissa/olora lack
        description="grpo: weight of the KL penalty per token to the reference (the base without the adapter); "
        "higher = closer. Its own field: dpo/kto's beta is a temperature where lower means further, and 0 here "
        "(TRL's default) lets held-out accuracy drift.",
    )
    epsilon: float = Field(
        0.2, gt=0, lt=1, description="grpo: clip range of the probability ratio to the generating policy."
    )
    grpo_loss: Literal["grpo", "dr_grpo", "token"] = Field(
        "grpo",
        description="grpo: how token losses are averaged: grpo (per answer, then over answers), dr_grpo (summed per "
        "answer over max_new_tokens: Dr. GRPO's constant), token (over all the step's answer tokens).",
    )
    updates_per_generation: int = Field(
        1,
        ge=1,
        description="grpo: optimizer steps on each step's sampled answers (later ones clip the probability ratio "
        "to the weights that sampled them).",
    )

    # --- GRPO rewards ------------------------------------------------------------------------------
    reward: Annotated[tuple[str, ...], Field(min_length=1)] = Field(
        ("exact",),
        description="grpo: what a completion scores, the weighted sum of these rewards, each NAME[=WEIGHT] (weight "
        "1 unless given; 0 logs a reward without training on it). Built in: exact (1 if the completion equals the "
        "row's reference, surrounding whitespace aside, else 0), regex:PATTERN (1 if the pattern is found in it, "
        "else 0), json (0 unless it is valid JSON; then the share of a JSON reference's fields it got right, or 1 "
        "where the reference is not a JSON object), length:N (-(tokens beyond N)/N, down to -1), or "
        "path/to/file.py:function, called as function(prompts=, completions=, **columns) with each extra column of "
        "the rows (reference included) and returning one number per completion. Repeat the flag for several "
        "(--reward json --reward length:200=0.5); in YAML, a list.",
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

    @field_validator("modules_to_save", mode="before")
    @classmethod
    def _split_saved(cls, v):
        return _split_list(v) if isinstance(v, str) else v

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

    @field_validator("reward", mode="before")
    @classmethod
    def _one_reward(cls, v):
        return (v,) if isinstance(v, str) else v  # YAML's `reward: json`

    @field_validator("reward")
    @classmethod
    def _check_rewards(cls, v):
        specs = [parse_reward(text) for text in v]
        keys = [(s.name, s.argument, s.path) for s in specs]
        if twice := next((s for s, key in zip(specs, keys) if keys.count(key) > 1), None):
            raise ValueError(f"{twice.label} is given twice; give it once, with a weight if it should count more")
        return v

    @field_validator("max_memory")
    @classmethod
    def _check_memory(cls, v):
        if v is not None:
            parse_bytes(v)
        return v

    @field_validator("objective")
    @classmethod
    def _sft_data_settings(cls, v, info):
        # Preference rows are read by their own columns and always keep answers whole (prompts cut from the left);
        # grpo reads SFT shapes too (data_format, columns) but trains on no given answer and cuts prompts from the left
        if v == "grpo" and info.data.get("batch_size") == "auto":
            raise ValueError(
                "batch_size=auto is not planned for grpo yet (a pass holds batch_size x num_generations sampled "
                "answers); give batch_size as a number"
            )
        if v != "sft":
            default = lambda k: cls.model_fields[k].get_default(call_default_factory=True)  # noqa: E731
            fixed = GRPO_FIXED if v == "grpo" else SFT_ONLY
            changed = [k for k in fixed if k in info.data and info.data[k] != default(k)]
            if changed:
                k = changed[0]
                rows = (
                    "grpo trains on sampled answers and cuts prompts from the left"
                    if v == "grpo"
                    else "preference rows have fixed columns (prompt, chosen, rejected; completion, label for kto) "
                    "and keep answers whole"
                )
                raise ValueError(f"{k}={info.data[k]} is for sft only: {rows}; leave {k} at its default")
        return v

    @field_validator(*OBJECTIVE_SETTINGS)
    @classmethod
    def _for_this_objective(cls, v, info):
        objective, used_by = info.data.get("objective"), OBJECTIVE_SETTINGS[info.field_name]
        if objective is not None and objective not in used_by and v != cls.model_fields[info.field_name].default:
            raise ValueError(f"is for objective {' or '.join(used_by)}, and this run's objective is {objective}")
        return v

    @field_validator("objective", "grpo_beta")
    @classmethod
    def _reference_is_the_base(cls, v, info):
        # dpo's, kto's and grpo's KL reference is the model with the adapter off, which pissa/olora leave without
        # part of the base
        objective = v if info.field_name == "objective" else info.data.get("objective")
        uses_reference = objective in ("dpo", "kto") or (objective == "grpo" and info.field_name == "grpo_beta" and v)
        if uses_reference and info.data.get("lora_init") in BASE_CHANGING_INITS:
            raise ValueError(
                f"{objective} compares with the base model (the adapter off), and lora_init "
                f"{info.data['lora_init']} moves part of the base into the adapter; use lora_init kaiming or gaussian"
                + (", or grpo_beta 0" if objective == "grpo" else "")
            )
        return v

    @field_validator("lora_init")
    @classmethod
    def _one_variant_of_the_weight(cls, v, info):
        if v in BASE_CHANGING_INITS and info.data.get("use_dora"):
            raise ValueError(f"lora_init {v} with use_dora is not supported; choose one of them")
        return v

    @field_validator("columns")
    @classmethod
    def _check_roles(cls, v):
        unknown = sorted(set(v) - set(COLUMN_ROLES))
        if unknown:
            raise ValueError(f"unknown role {unknown[0]!r}; roles are {', '.join(COLUMN_ROLES)}")
        return v


# Data settings that shape SFT examples only.
SFT_ONLY = ("data_format", "columns", "truncation", "train_on_inputs")
GRPO_FIXED = ("truncation", "train_on_inputs")  # grpo reads SFT shapes (data_format, columns) for their prompts

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
    if origin is tuple:
        return "a non-empty list of text (YAML list, or the flag repeated)"
    if origin is dict:
        return "a mapping (YAML mapping or key=value pairs separated by commas)"
    return str(annotation)
