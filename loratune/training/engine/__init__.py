"""How the processes train together: one class per engine (`base.Engine` for one process, `ddp`, `fsdp`, `zero`),
chosen by `launch.start` from what the launcher asked for. The loop talks to the engine object and never asks
which one it is."""

from .base import Engine
from .launch import Launch, LaunchRefused, launched, start

__all__ = ["Engine", "Launch", "LaunchRefused", "launched", "start"]
