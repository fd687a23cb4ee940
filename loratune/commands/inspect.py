"""`loratune data inspect`: the data's lengths (data.inspect), with the peak memory of training at each max_length
shown (commands.plan)."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import TYPE_CHECKING

from ..core.config import TrainConfig
from ..core.errors import UserError

if TYPE_CHECKING:
    from ..data.inspect import Inspection


def inspect(cfg: TrainConfig, percentile: float) -> tuple[Inspection, list[str]]:
    """The inspection of cfg's data, and a line of estimated peak training memory per max_length it shows."""
    if not cfg.train_data:
        raise UserError("data inspect: give a run config (loratune data inspect run.yaml) or a data file (--data FILE)")
    # Imported after the check, which then answers without loading torch.
    from ..data.encode import encoder_for
    from ..data.inspect import inspect_data
    from ..data.inspect_pairs import inspect_pairs
    from ..modeling.model import load_tokenizer, resolve_model

    of = inspect_data if cfg.objective == "sft" else inspect_pairs
    ins = of(cfg, encoder_for(load_tokenizer(resolve_model(cfg.model)), cfg), percentile)
    return ins, memory_lines(cfg, [e.max_length for e in (ins.current, ins.at_recommended) if e])


def memory_lines(cfg: TrainConfig, max_lengths: list[int]) -> list[str]:
    from .plan import peak_bytes

    out = []
    for max_length in max_lengths:
        try:
            peak = peak_bytes(cfg.model_copy(update={"max_length": max_length}))
        except UserError as e:
            return [f"memory estimate unavailable: {e}"]
        out.append(f"estimated peak training memory at max_length={max_length}: {peak / 2**30:.2f} GiB")
    return out


def text(ins: Inspection, memory: list[str], cfg: TrainConfig) -> str:
    from ..data.inspect import render

    return "\n".join([render(ins, cfg), *memory])


def to_json(ins: Inspection, memory: list[str]) -> str:
    return json.dumps(asdict(ins) | {"memory": memory}, indent=1)
