"""DDP: every process holds the whole model and trains on its share of each step; gradients are averaged over the
processes at the step's last pass."""

from __future__ import annotations

import contextlib

import torch

from .base import Engine


class DDP(Engine):
    kind = "DDP"

    def describe(self) -> str:
        processes = f"{self.processes} process{'es' if self.processes > 1 else ''}"
        where = f"{processes} on {self.nodes} node{'s' if self.nodes > 1 else ''}"
        return f"engine: {self.kind}, {where}, backend {self.backend}, device {self.device.type}"

    def unwrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """Outside DDP, whose forward pass syncs buffers: validation's shares may differ in passes."""
        return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module

    @contextlib.contextmanager
    def no_sync(self, module: torch.nn.Module):
        with self.accelerator.no_sync(module):
            yield
