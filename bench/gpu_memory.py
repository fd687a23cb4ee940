"""`loratune plan`'s estimate of one training pass against the measured peak, on the GPU benchmark's shapes.

    python -m bench.gpu_memory CONTEXT.json RESULTS.jsonl

The cases of `bench/memory_accuracy.py` (`run_case`: measured with torch.cuda.max_memory_allocated on CUDA, the
CPU allocator's running total on CPU; estimated with `MemoryModel.batch_bytes`) on the random-weight models that
`bench.gpu` wrote: packed and padded, with and without gradient checkpointing, and 4-bit when bitsandbytes is
installed. Each case is appended to RESULTS.jsonl as it ends, so a run cut short keeps what it measured; a case
that fails is recorded with its error and the next one runs.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import sys
import time
import traceback
from pathlib import Path

import torch

from .memory_accuracy import run_case

# (lengths, answer share) of a pass: on a GPU the Training Guide's default pass, 8 x 1024 tokens (the padded pass
# with shorter rows, so padding is real); on a CPU a few hundred tokens.
PASSES = {
    "cuda": {"packed": ([1024] * 8, 0.5), "padded": ([1024] * 4 + [700] * 4, 0.5)},
    "cpu": {"packed": ([100, 200, 50], 0.5), "padded": ([300, 250, 10, 100], 0.5)},
}


def cases(context: dict) -> dict[str, tuple]:
    """label: run_case's arguments (model folder, lengths, answer share, settings)."""
    device, models = context["device"], context["models"]
    passes = PASSES["cuda" if device == "cuda" else "cpu"]
    out = {}
    for i, (shape, path) in enumerate(models.items()):
        for batching in ("packed", "padded") if i == 0 else ("packed",):  # padded once
            for checkpointing in (False, True):
                lengths, share = passes[batching]
                settings = {"packing": batching == "packed", "gradient_checkpointing": checkpointing}
                label = f"{shape}, {batching} {len(lengths)} x {max(lengths)}" + (", checkpointing" * checkpointing)
                out[label] = (path, lengths, share, settings)
    if device == "cuda" and importlib.util.find_spec("bitsandbytes"):
        lengths, share = passes["packed"]
        for shape, path in models.items():
            out[f"{shape}, packed, 4-bit base (QLoRA)"] = (path, lengths, share, {"load_in_4bit": True})
    return out


def main() -> None:
    context, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    device = torch.device(context["device"])
    for label, (path, lengths, share, settings) in cases(context).items():
        start = time.perf_counter()
        try:
            tokens, dtype, measured, estimated = run_case(path, lengths, share, settings, device)
            row = {"tokens": tokens, "base": dtype, "measured": measured, "estimated": estimated}
            row |= {"ratio": estimated / measured, "status": "ok"}
        except Exception as e:
            traceback.print_exc()
            row = {"status": "failed", "detail": f"{type(e).__name__}: {e}".splitlines()[0][:500]}
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        row |= {"case": label, "seconds": time.perf_counter() - start}
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
