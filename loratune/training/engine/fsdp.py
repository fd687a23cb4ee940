"""FSDP2 (torch's fully_shard): each decoder layer its own unit, the rest (embeddings, final norm, output layer) the
root's. Frozen weights, adapter weights, their gradients and so the optimizer state are all split over the
processes; a layer's weights are gathered only while it runs."""

from __future__ import annotations

import contextlib

import torch

from ...memory.arithmetic import FSDP2_SHARDS
from .ddp import DDP


class FSDP2(DDP):
    kind = "FSDP2"
    sharded = True
    sharding = FSDP2_SHARDS

    def __init__(self, accelerator, processes: int, nodes: int, backend: str | None, reshard_after_forward: bool):
        super().__init__(accelerator, processes, nodes, backend)
        self.reshard_after_forward = reshard_after_forward  # free each layer's gathered weights after its forward

    def check(self, cfg, dtype: torch.dtype) -> None:
        refuse_4bit(self, cfg)

    def shard(self, module: torch.nn.Module) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.device.type, (self.processes,))
        decoder = module.model.get_base_model().get_decoder()
        for layer in getattr(decoder, "layers", []):
            fully_shard(layer, mesh=mesh, reshard_after_forward=self.reshard_after_forward)
        fully_shard(module, mesh=mesh, reshard_after_forward=self.reshard_after_forward)

    def prepare(self, module: torch.nn.Module, optimizer, micro_batch: int, cfg):
        return module, optimizer  # fully_shard did the wrapping; accelerate's own FSDP runs only on GPUs

    def held_here(self, model: torch.nn.Module) -> str:
        return held_text(self.kind, model)

    def unwrap(self, module: torch.nn.Module) -> torch.nn.Module:
        return module  # every pass gathers the weights: validation runs through the sharded module

    @contextlib.contextmanager
    def no_sync(self, module: torch.nn.Module):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)


def refuse_4bit(engine, cfg) -> None:
    from .launch import LaunchRefused

    if cfg.load_in_4bit:
        raise LaunchRefused(
            f"load_in_4bit: loratune does not run {engine.kind} on 4-bit weights; use DDP, or a 16-bit base"
        )


def held_text(kind: str, model: torch.nn.Module) -> str:
    """What this process holds of the sharded weights: its shards (or ZeRO-3's slices), not the whole."""

    def count(params) -> tuple[int, int]:
        params = list(params)
        return sum(_held(p) for p in params), sum(getattr(p, "ds_numel", p.numel()) for p in params)

    trainable = count(p for p in model.parameters() if p.requires_grad)
    every = count(model.parameters())
    return (
        f"{kind}: this process holds {trainable[0]:,} of the {trainable[1]:,} trainable parameters (and their "
        f"gradients and AdamW state), {every[0]:,} of all {every[1]:,}"
    )


def _held(p) -> int:
    if hasattr(p, "ds_tensor"):  # ZeRO-3's slice, the last one padded
        return min(p.ds_tensor.numel(), max(0, p.ds_numel - p.ds_tensor.numel() * torch.distributed.get_rank()))
    return p.to_local().numel() if hasattr(p, "to_local") else p.numel()
