"""One process: the engine every other one refines. It holds everything the loop asks of an engine, so the loop
never asks which engine runs: set the model up (`shard`, `prepare`), run a pass's backward, keep a pass's gradients
local (`no_sync`), update, read and write the trained state as whole tensors, and say what the run may do (replay
a step with smaller passes, cut a step in the middle, answer the held-out test during training)."""

from __future__ import annotations

import contextlib
import math

import torch


class Engine:
    kind = "single process"
    sharded = False  # the weights are split over the processes (FSDP2, ZeRO-3)
    sharding = None  # how the trained state lies on a device when sharded (memory.arithmetic.Sharding)

    def __init__(self, accelerator, processes: int = 1, nodes: int = 1, backend: str | None = None):
        self.accelerator = accelerator
        self.processes, self.nodes, self.backend = processes, nodes, backend
        self.device: torch.device = accelerator.device

    # --- What a run may do ------------------------------------------------------------------------------

    @property
    def shards(self) -> int:
        """How many ways the weights, gradients and optimizer state are split (the memory planner's divisor)."""
        return self.processes if self.sharded else 1

    @property
    def load_device(self) -> torch.device:
        """Where the base is loaded: sharding moves each process's part to its device, so a sharded base is read
        into host memory first rather than whole onto one GPU."""
        return torch.device("cpu") if self.sharded else self.device

    @property
    def holds_whole_model(self) -> bool:
        """Whether this process holds every weight: it can generate (the held-out test) and run a trial pass alone."""
        return not self.sharded

    @property
    def may_replay_smaller(self) -> bool:
        """Whether a step that ran out of memory may be replayed with smaller passes: with several processes the
        others are inside the same step, some in a collective operation waiting for this one."""
        return self.processes == 1

    @property
    def may_cut_steps(self) -> bool:
        """Whether a stop between two passes may save the step's gradients so far (one process's, whole)."""
        return self.processes == 1

    @property
    def eval_processes(self) -> int:
        """Processes that share validation's passes: sharded, each runs every pass (each gathers the weights)."""
        return 1 if self.sharded else self.processes

    def check(self, cfg, dtype: torch.dtype) -> None:
        """Refuse settings this engine cannot train with, before any weight is loaded."""

    def describe(self) -> str:
        return f"engine: single process, device {self.device}"

    # --- Setting the model up ---------------------------------------------------------------------------

    def shard(self, module: torch.nn.Module) -> None:
        """Split the weights over the processes, before the optimizer is made (FSDP2 replaces the parameters)."""

    def prepare(self, module: torch.nn.Module, optimizer, micro_batch: int, cfg):
        """The module the passes run through, and the optimizer, as this engine wraps them."""
        return self.accelerator.prepare(module, optimizer)

    def held_here(self, model: torch.nn.Module) -> str | None:
        """What this process holds of sharded weights, for the start line; None when it holds them all."""
        return None

    def unwrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """The module inside the engine's wrapper, for passes that need no gradient synchronisation."""
        return module

    # --- A step -----------------------------------------------------------------------------------------

    def backward(self, module: torch.nn.Module, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    @contextlib.contextmanager
    def no_sync(self, module: torch.nn.Module):
        """Accumulate this pass's gradients locally; they are reduced with the step's last pass."""
        yield

    def update(self, module, optimizer, trainable, cfg, loss: float) -> tuple[float, bool]:
        """Clip to max_grad_norm > 0 (the norm over all processes' shards), then update unless the loss or the
        gradient is not finite. Returns the gradient norm before clipping, and whether the update was made."""
        grad_norm = float(self.accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm or float("inf")))
        finite = math.isfinite(loss) and (math.isfinite(grad_norm) or cfg.precision == "fp16")
        if finite:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm, finite

    # --- Trained state as whole tensors (checkpoints resume on any engine and number of processes) --------

    def adapter_state(self, model) -> dict[str, torch.Tensor]:
        """The adapter's weights, whole, on every process (all processes call it). LoRA's weights only."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=_whole(ignore_frozen_params=True))

    def load_adapter_state(self, model, state: dict[str, torch.Tensor]) -> None:
        """Set whole trained weights (named as the model's parameters); each process takes its part."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, state, options=_whole(ignore_frozen_params=True))

    def optimizer_state(self, module, optimizer) -> dict:
        """AdamW's state, whole tensors keyed by parameter name."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(module, optimizer, options=_whole(cpu_offload=True))

    def load_optimizer_state(self, module, optimizer, saved: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(module, optimizer, saved, options=_whole())


def _whole(**options):
    """Whole (unsharded) tensors, as one process would hold them: checkpoints resume on any number of processes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **options)
