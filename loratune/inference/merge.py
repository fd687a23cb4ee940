"""`loratune merge`: base + adapter as one ordinary transformers model folder.

The folder holds safetensors shards, config, generation config (stopping at the end tokens used in training),
and the tokenizer files saved with the adapter, so the chat template is the one the run trained with.
`AutoModelForCausalLM.from_pretrained(folder)` loads it with no loratune or PEFT installed.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.config import TrainConfig
from ..core.device import DTYPES
from ..core.errors import UserError, first_line
from ..core.files import atomic_dir, check_replaceable
from ..core.sources import read_run_config
from ..modeling.adapter import quiet_peft
from ..modeling.model import load_model, load_tokenizer, nf4_config, resolve_model
from ..modeling.reference import with_reference
from .run import locate_run, run_end_ids

# Files of the adapter folder that are PEFT's, not the tokenizer's.
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md"}
SHARD_SIZE = "5GB"  # the hub's usual shard size
MERGE_RECORD = "loratune-merge.json"  # marks a folder as merge's output, which --overwrite may replace


def merge(
    run_dir: str | Path, out: str | Path, adapter: str = "adapter", dtype: str | None = None, overwrite: bool = False
) -> Path:
    """Write base + adapter, merged, to `out`; `dtype` (bf16, fp16, fp32) defaults to the base's stored dtype."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite or not out.is_dir():
            raise UserError(f"--out {out}: already exists; choose another folder or pass --overwrite")
        marked = (out / MERGE_RECORD).is_file()
        check_replaceable(out, "--out", lambda entry: marked or entry.name.startswith("."))
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    merged = merged_model(run_dir, adapter, DTYPES[dtype] if dtype else None)
    model, run_dir, folder = merged.model, merged.run_dir, merged.adapter
    with atomic_dir(out.resolve()) as tmp:  # resolved: "." has no name to write next to
        model.save_pretrained(tmp, max_shard_size=SHARD_SIZE)
        for f in folder.iterdir():  # the tokenizer and chat template exactly as saved with the adapter
            if f.is_file() and f.name not in ADAPTER_FILES:
                shutil.copy2(f, tmp / f.name)
        (tmp / MERGE_RECORD).write_text(
            json.dumps(
                {
                    "run": str(run_dir.resolve()),
                    "adapter": str(folder.resolve()),
                    "base": merged.base,
                    "dtype": str(model.dtype).removeprefix("torch."),
                },
                indent=1,
            )
        )
    return out


@dataclass
class Merged:
    model: torch.nn.Module  # base + adapter as one plain transformers model, on the CPU
    run_dir: Path
    adapter: Path  # the adapter folder, which also holds the tokenizer and chat template of the run
    base: str  # the base model's folder (or hub id)
    config: TrainConfig


def merged_model(run_dir: str | Path, adapter: str = "adapter", dtype: torch.dtype | None = None) -> Merged:
    """The run's base with its adapter merged in, in `dtype` (default: the base's stored dtype); generation stops at
    the end tokens training used."""
    from peft import PeftModel

    run_dir, folder = locate_run(run_dir, adapter)
    cfg = read_run_config(run_dir)
    model_path = resolve_model(cfg.model)
    target = dtype or stored_dtype(model_path)
    stored = _stored_quantized(model_path)
    if cfg.load_in_4bit or stored:
        base = _dequantised_base(model_path, target, stored)
    else:
        base = load_model(model_path, target, torch.device("cpu"))
    base = with_reference(base, cfg)
    with quiet_peft():
        model = PeftModel.from_pretrained(base, folder).merge_and_unload()
    model.config.use_cache = True  # load_model turns the cache off for training; generation wants it
    _stop_at_training_end_tokens(model, folder)
    return Merged(model, run_dir, folder, model_path, cfg)


def stored_dtype(model_path: str) -> torch.dtype:
    """The dtype the base's weights are stored in (its config's `dtype`); fp32 when it does not say."""
    from transformers import AutoConfig

    value = getattr(AutoConfig.from_pretrained(model_path), "dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else torch.float32


def _stored_quantized(model_path: str) -> bool:
    config = Path(model_path) / "config.json"
    return config.is_file() and "quantization_config" in json.loads(config.read_text())


def _dequantised_base(model_path: str, dtype: torch.dtype, stored: bool):
    """The quantized base the adapter was trained on (`stored` quantized, else loaded as training did), dequantised:
    adding LoRA to 4-bit weights would round the update away, and merging into the original weights would not be
    the model that was trained."""
    from transformers import AutoModelForCausalLM

    try:
        quantization = None if stored else nf4_config(dtype)
        base = AutoModelForCausalLM.from_pretrained(
            model_path,
            dtype=dtype,
            quantization_config=quantization,
            device_map="cuda" if torch.cuda.is_available() else None,
        )
        base = base.dequantize(dtype=dtype)
    except (ImportError, RuntimeError, ValueError, NotImplementedError) as e:
        what = "is stored quantized" if stored else "was trained in 4-bit (load_in_4bit)"
        raise UserError(
            f"the base model {what}: merging needs it dequantised, which failed here "
            f"({type(e).__name__}: {first_line(e)}). Dequantising 4-bit weights needs a CUDA GPU "
            "with bitsandbytes; or keep using the adapter on the base (loratune generate / chat)"
        ) from None
    return base.to("cpu")


def _stop_at_training_end_tokens(model, folder: Path) -> None:
    """Generation stops where training taught the model to stop: the end tokens of the run's encoder (end of
    sequence, the template's end of turn) and the base's own."""
    tokenizer = load_tokenizer(str(folder))
    gen = model.generation_config
    ends = run_end_ids(tokenizer, model)
    gen.eos_token_id = sorted(ends)[0] if len(ends) == 1 else sorted(ends)
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
