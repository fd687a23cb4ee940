"""Writing a GGUF file whole or not at all, one tensor at a time (the converted copy of the model is never held in
memory at once), in the number formats of the PyPI gguf package's own converters and quantizers."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...core.errors import UserError
from ...core.files import io_message

# Re-exported (`as`): build.py imports the formats from here.


def qtype(name: str):
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[name.upper()]


def file_type(name: str) -> int:
    from gguf import LlamaFileType

    return LlamaFileType[{"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16"}.get(name, "MOSTLY_" + name.upper())]


@dataclass
class Planned:
    name: str
    tensor: torch.Tensor
    kind: object  # GGMLQuantizationType


def plan_tensor(name: str, tensor: torch.Tensor, wanted: str):
    """A tensor and the format it is written in: `wanted` for weight matrices, F32 for vectors. With 4-bit weights
    the embedding and output layer are 8-bit, as in the built-in model's own Q4_1 file; a matrix whose rows do not
    divide into quantization blocks is F16."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    kind = qtype(wanted)
    if tensor.dim() < 2:
        kind = GGMLQuantizationType.F32
    elif kind in (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1) and name.startswith(("token_embd", "output.")):
        kind = GGMLQuantizationType.Q8_0
    if tensor.shape[-1] % GGML_QUANT_SIZES[kind][0]:
        kind = GGMLQuantizationType.F16
    return Planned(name, tensor, kind)


def _encode(tensor: torch.Tensor, kind) -> np.ndarray:
    from gguf import quants

    return quants.quantize(tensor.detach().to(torch.float32).numpy(), kind)


def _info(p: Planned) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape as stored, numpy dtype, bytes) of a planned tensor, without converting it."""
    from gguf import GGMLQuantizationType, quant_shape_to_byte_shape

    shape = tuple(p.tensor.shape)
    plain = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}.get(p.kind)
    if plain is not None:
        return shape, np.dtype(plain), int(np.prod(shape)) * np.dtype(plain).itemsize
    stored = quant_shape_to_byte_shape(shape, p.kind)
    return stored, np.dtype(np.uint8), int(np.prod(stored))


def write_gguf(path: Path, arch: str, metadata: Callable, tensors: list[Planned]) -> int:
    """Write the file: `metadata(writer)` adds the key-values, then the tensors in order. Written under a
    temporary name and renamed, so a failure (a full disk) leaves nothing behind. Returns the size in bytes."""
    from gguf import GGUFWriter

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer = GGUFWriter(tmp, arch)
    try:
        metadata(writer)
        for p in tensors:
            shape, dtype, nbytes = _info(p)
            writer.add_tensor_info(p.name, shape, dtype, nbytes, raw_dtype=None if dtype != np.uint8 else p.kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for p in tensors:
            writer.write_tensor_data(_encode(p.tensor, p.kind))
        writer.flush()
        for f in writer.fout or []:
            os.fsync(f.fileno())
        writer.close()
        os.replace(tmp, path)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise UserError(f"disk full while writing {path}; nothing half-written was kept. Free space and export "
                            "again") from None  # fmt: skip
        raise UserError(io_message(path, e)) from None
    finally:
        with contextlib.suppress(OSError):
            writer.close()
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return path.stat().st_size
