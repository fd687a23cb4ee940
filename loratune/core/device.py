"""Where training runs and in which number format: the device, the frozen base's dtype, and process memory."""

from __future__ import annotations

import ctypes
import functools
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from .cache import cache_dir
from .errors import UserError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
KEPT_FREE_BYTES = 256 * 2**20  # freed memory glibc keeps at the heap's top in CPU training (keep_freed_cpu_memory)


def dtype_name(dtype: torch.dtype) -> str:
    """bf16 / fp16 / fp32, as the `precision` setting names them."""
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype).removeprefix("torch."))


def resolve_device(name: str) -> torch.device:
    """The device a `device` setting means (auto: CUDA, else Apple's MPS, else CPU), or a named one such as cuda:1."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    gpus = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    kind = name.split(":")[0]
    if not gpus.get(kind, True):  # else a run would fail later, or (mps) quietly train on the CPU
        here = ", ".join(["auto", "cpu", *(k for k, ok in gpus.items() if ok)])
        raise UserError(
            f"device = {name!r}: PyTorch sees no {'CUDA' if kind == 'cuda' else 'MPS (Apple)'} GPU here; use {here}"
        )
    return torch.device(name)


def choose_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The frozen base's dtype. `auto`: bf16 (fp16 without bf16) on GPUs; on CPUs bf16 only where measured faster."""
    if precision == "fp16" and device.type != "cuda":
        raise UserError(f"precision = 'fp16' needs a CUDA GPU; on {device.type} use bf16 or fp32 (or auto)")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("precision = 'bf16': this GPU has no bf16 support; use fp16 or auto")
    if precision != "auto":
        return DTYPES[precision]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_bf16_speedup() >= 1.3:
        return torch.bfloat16
    return torch.float32


@functools.cache
def cpu_bf16_speedup() -> float:
    """bf16 over fp32 matrix-product speed on this CPU, measured once and remembered per CPU and torch version.

    Many CPUs advertise bf16 instructions yet run bf16 products slower than fp32, so we measure rather than trust.
    """
    record = cache_dir() / "cpu-bf16.json"
    key = f"{cpu_name()}|{'+'.join(cpu_bf16_features())}|{torch.__version__}|{torch.get_num_threads()}"
    try:
        known = json.loads(record.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = _matmul_seconds(torch.float32) / _matmul_seconds(torch.bfloat16)
        try:
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps(known, indent=1))
        except OSError:  # an unwritable cache only costs the next run this measurement
            pass
    return known[key]


# What a training process holds before its first tensor: the interpreter, PyTorch, transformers, PEFT and accelerate
# with their kernels and thread pools started (one small LoRA-shaped forward and backward pass).
RUNTIME_PROBE = """
import resource, torch
import loratune.training.loop
x = torch.randn(64, 256, requires_grad=True)
(x @ torch.randn(256, 256) @ torch.randn(256, 8) @ torch.randn(8, 256)).sum().backward()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@functools.cache
def cpu_runtime_bytes() -> int:
    """A CPU training process's own peak resident memory beyond its tensors (Python, PyTorch and the libraries),
    measured once in a fresh process and remembered per CPU, Python and torch version, like `cpu_bf16_speedup`."""
    key = f"{cpu_name()}|{sys.version.split()[0]}|{torch.__version__}|{torch.get_num_threads()}"
    record = cache_dir() / "cpu-runtime.json"
    try:
        known = json.loads(record.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        probe = subprocess.run([sys.executable, "-c", RUNTIME_PROBE], capture_output=True, text=True, check=True)
        kib = int(probe.stdout.split()[-1])  # ru_maxrss: KiB on Linux, bytes on macOS
        known[key] = kib if sys.platform == "darwin" else kib * 1024
        try:
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps(known, indent=1))
        except OSError:  # an unwritable cache only costs the next plan this measurement
            pass
    return known[key]


def _matmul_seconds(dtype: torch.dtype, n: int = 1024, reps: int = 8) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, time.perf_counter() - start)
    return best


# The instruction sets bf16 matrix products run on: CPUs of one model name differ in them (an "AMD EPYC" with
# AVX-512 BF16 runs bf16 faster than fp32, one with AVX2 only far slower).
BF16_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_bf16_features() -> list[str]:
    """Which of BF16_FLAGS this CPU has (Linux's /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [f for f in BF16_FLAGS if f in flags]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def keep_freed_cpu_memory() -> None:
    """Have glibc keep freed blocks for reuse instead of handing them back to the OS (Linux; for CPU training).

    A training step frees and re-allocates the same activation-sized tensors hundreds of times, and PyTorch's CPU
    allocator keeps no cache: glibc serves each block above its mmap threshold with fresh pages, every one a page
    fault and a page of zeroing. With the thresholds raised, 6 steps of the benchmark's tiny model took 190k page
    faults instead of 630k, and a step about 3% less time (medians of 6 alternating runs).
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # another C library (e.g. musl): leave it as it is
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt's parameter numbers
    libc.mallopt(m_mmap_threshold, 32 * 2**20)  # the largest glibc accepts on 64-bit
    libc.mallopt(m_trim_threshold, KEPT_FREE_BYTES)


def peak_memory(device) -> dict:
    """The run's peak memory, for summary.json: tensors on a CUDA device, else the process's resident memory."""
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device), "peak_memory_of": "CUDA tensors"}
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {
        "peak_memory_bytes": rss if sys.platform == "darwin" else rss * 1024,
        "peak_memory_of": "process resident memory",
    }
