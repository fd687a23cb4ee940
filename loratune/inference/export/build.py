"""`loratune export --format gguf`: a run as one GGUF file for llama.cpp, Ollama and LM Studio (the merged model,
or the adapter alone), with an Ollama Modelfile beside it. Written with the PyPI gguf package: nothing is
downloaded or compiled at export time."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from ...core.errors import UserError
from ...core.files import atomic_write
from ...core.sources import read_run_config
from ...modeling.model import load_tokenizer, resolve_model
from ...modeling.variants import PEFT_BASE_CHANGING
from ..merge import merged_model
from ..run import PLAIN_FORMATS, locate_run, trained_format
from .arch import Shape, TensorNames, extra_tensors, model_shape, write_hyperparameters
from .formats import check_type
from .modelfile import RAW_GO, go_template, modelfile
from .vocab import end_tokens, source_gguf, write_chat, write_tokenizer
from .writer import Planned, file_type, plan_tensor, write_gguf

# What a GGUF LoRA adapter (plain A and B matrices, one alpha, the rank read from the tensors) cannot hold.
UNSUPPORTED_ADAPTER = {
    "use_dora": "DoRA's magnitude vectors (llama.cpp adds B·A only)",
    "modules_to_save": "whole trained layers (modules_to_save)",
    "rank_pattern": "a rank per layer (rank_pattern)",
    "alpha_pattern": "an alpha per layer (alpha_pattern)",
}


@dataclass
class Exported:
    path: Path
    modelfile: Path
    size: int
    translated: bool  # the Modelfile's TEMPLATE renders the run's prompts (else Ollama uses the GGUF's template)


def export_gguf(
    run_dir: str | Path,
    out: str | Path | None = None,
    kind: str = "f16",
    adapter_only: bool = False,
    overwrite: bool = False,
    adapter: str = "adapter",
) -> Exported:
    """Write the run's merged model (or with `adapter_only`, its LoRA adapter) as GGUF weights of `kind`."""
    from transformers import AutoConfig

    check_type(kind, adapter_only)
    run_dir, folder = locate_run(run_dir, adapter)
    if adapter_only:
        check_plain_lora(folder)
    cfg = read_run_config(run_dir)
    if adapter_only and cfg.reference:
        raise UserError(
            f"--adapter-only: this run's adapter was trained on top of {cfg.reference} (reference), whose adapter "
            "llama.cpp would not apply; export the merged model (without --adapter-only)"
        )
    model_path = resolve_model(cfg.model)
    config = AutoConfig.from_pretrained(model_path)
    shape = model_shape(config)  # an unsupported model is refused before any weights are read
    name = f"{run_dir.resolve().name}{'-adapter' if adapter_only else ''}-{kind}.gguf"
    out = Path(out) if out else run_dir / name
    modelfile_path = _check_outputs(out, overwrite)

    tokenizer = load_tokenizer(str(folder))  # saved with the adapter: the chat template the run trained with
    raw = trained_format(run_dir, cfg) in PLAIN_FORMATS
    ends = end_tokens(tokenizer, tokenizer.chat_template, _base_end_ids(model_path))
    go = RAW_GO if raw else go_template(tokenizer, tokenizer.chat_template)
    header = partial(_general, name=run_dir.resolve().name, kind=kind)
    if adapter_only:
        tensors, alpha = _adapter_tensors(folder, shape, kind)

        def metadata(writer):
            header(writer, "adapter")
            writer.add_string("adapter.type", "lora")
            writer.add_float32("adapter.lora.alpha", alpha)

        base = source_gguf(model_path)
        text = modelfile(str(base or model_path), go, ends.texts, adapter=f"./{out.name}")
    else:
        model = merged_model(run_dir, adapter, torch.float32).model  # fp32: rounded once, to `kind`, when written
        tensors = _model_tensors(model, config, shape, kind)
        template = None if raw else tokenizer.chat_template

        def metadata(writer):
            header(writer, "model")
            write_hyperparameters(writer, config, shape)
            write_tokenizer(writer, tokenizer, model_path, config.vocab_size)
            write_chat(writer, template, ends)

        text = modelfile(f"./{out.name}", go, ends.texts)
    size = write_gguf(out, shape.family.arch, metadata, tensors)
    atomic_write(modelfile_path, text)
    return Exported(out, modelfile_path, size, go is not None)


def _general(writer, kind_of_file: str, name: str, kind: str) -> None:
    """The general.* keys every GGUF file carries."""
    writer.add_type(kind_of_file)
    writer.add_name(name)
    writer.add_file_type(file_type(kind))
    if kind not in ("f16", "bf16"):
        from gguf import GGML_QUANT_VERSION

        writer.add_quantization_version(GGML_QUANT_VERSION)


def _check_outputs(out: Path, overwrite: bool) -> Path:
    """Refuse to replace files unless asked; returns the Modelfile's path (beside the GGUF, same name)."""
    if out.suffix != ".gguf":
        raise UserError(f"--out {out}: give a file name ending in .gguf")
    modelfile_path = out.with_suffix(".Modelfile")
    for path in (out, modelfile_path):
        if path.is_dir():
            raise UserError(f"--out {out}: {path} is a folder; give a file name")
        if path.exists() and not overwrite:
            raise UserError(f"{path}: already exists; choose another --out or pass --overwrite")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create its folder ({e.strerror or e})") from None
    return modelfile_path


def _base_end_ids(model_path: str) -> set[int]:
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
    except OSError:  # a base without generation_config.json
        return set()
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


def _model_tensors(model, config, shape: Shape, kind: str) -> list[Planned]:
    names = TensorNames(shape)
    planned = []
    for hf_name, tensor in model.state_dict().items():
        if shape.tied and hf_name == "lm_head.weight":  # llama.cpp reuses the embedding when output.weight is absent
            continue
        name = names.name(hf_name)
        planned.append(plan_tensor(name, names.weight(name, tensor), kind))
    planned += [plan_tensor(name, t, kind) for name, t in extra_tensors(config, shape).items()]
    return planned


def _adapter_tensors(folder: Path, shape: Shape, kind: str) -> tuple[list[Planned], float]:
    """The LoRA matrices under llama.cpp's names (`blk.0.attn_q.weight.lora_a`), and the adapter's alpha.
    llama.cpp scales B·A by alpha / rank, as PEFT does for plain LoRA."""
    from safetensors.torch import load_file

    settings = json.loads((folder / "adapter_config.json").read_text())
    weights_file = folder / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise UserError(f"{folder}: no adapter_model.safetensors (the adapter's weights) here")
    names = TensorNames(shape)
    planned = []
    for key, tensor in sorted(load_file(weights_file).items()):
        module, _, part = key.removeprefix("base_model.model.").rpartition(".lora_")
        if part not in ("A.weight", "B.weight"):
            raise UserError(f"{weights_file}: {key} is not a LoRA matrix of a linear layer, which GGUF adapters hold")
        name = names.name(module + ".weight")
        matrix = names.rows(name, tensor) if part == "B.weight" else tensor  # B's rows are the layer's outputs
        planned.append(plan_tensor(f"{name}.lora_{part[0].lower()}", matrix, kind))
    return planned, gguf_alpha(settings)


def gguf_alpha(settings: dict) -> float:
    """The alpha for llama.cpp, which scales B·A by alpha / rank: PEFT's scale (alpha / sqrt(rank) under rsLoRA)
    times the rank."""
    rank, alpha = settings["r"], float(settings["lora_alpha"])
    return alpha * rank**0.5 if settings.get("use_rslora") else alpha


def check_plain_lora(folder: Path) -> None:
    """Refuse, in one line pointing to the merged export, what a GGUF adapter cannot represent."""
    settings = json.loads((folder / "adapter_config.json").read_text())
    merged = "export the merged model instead (loratune export RUN --format gguf, without --adapter-only)"
    if settings.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{folder}: a GGUF adapter holds LoRA only, this is {settings['peft_type']}; {merged}")
    for key, what in UNSUPPORTED_ADAPTER.items():
        if settings.get(key):
            raise UserError(f"{folder}: a GGUF adapter cannot hold {what}; {merged}")
    if str(settings.get("init_lora_weights")).lower() in PEFT_BASE_CHANGING:
        raise UserError(
            f"{folder}: this adapter is {settings['init_lora_weights']}'s as trained, right only on the base it "
            "changed; export the run's adapter or last folder (saved converted to plain LoRA), or the merged model"
        )
