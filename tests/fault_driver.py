"""Runs `loratune train` in this process with one fault injected, for the reliability tests.

FAULT=kill_at_pass:N     SIGKILL just before the N-th training forward pass of this process
FAULT=kill_in_save:N     SIGKILL inside the N-th checkpoint save, after part of it is written
FAULT=signal_at_pass:N:SIG  send SIG (INT or TERM) to itself before the N-th pass; :SIG2 sends it twice
"""

import os
import signal
import sys

import torch

from loratune.cli import main
from loratune.modeling import loss

kind, _, spec = os.environ.get("FAULT", "").partition(":")
count, _, sig = spec.partition(":")
count = int(count or 0)
calls = {"pass": 0, "save": 0}

forward = loss.CausalLMLoss.forward


def faulty_forward(self, batch):
    if self.training:
        calls["pass"] += 1
        if calls["pass"] == count and kind == "kill_at_pass":
            os.kill(os.getpid(), signal.SIGKILL)
        if calls["pass"] == count and kind == "signal_at_pass":
            for _ in range(2 if sig.endswith("2") else 1):
                os.kill(os.getpid(), getattr(signal, "SIG" + sig.rstrip("2")))
    return forward(self, batch)


save = torch.save


def faulty_save(obj, path, *args, **kwargs):
    save(obj, path, *args, **kwargs)
    if kind == "kill_in_save" and str(path).endswith("optimizer.pt"):
        calls["save"] += 1
        if calls["save"] == count:  # the checkpoint folder holds the adapter and optimizer, not yet the rest
            os.kill(os.getpid(), signal.SIGKILL)


loss.CausalLMLoss.forward = faulty_forward
torch.save = faulty_save
sys.exit(main(sys.argv[1:]))
