"""What the distributed tests share: launching `loratune train` as users do, with one run's settings, and comparing
the adapters and the metrics the runs leave."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from conftest import varied_rows, write_jsonl
from safetensors.torch import load_file

DRIVER = str(Path(__file__).with_name("fault_driver.py"))  # `train` with a fault injected (FAULT=...)
ONE = ["-m", "loratune", "train"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(extra=None) -> dict:
    """This environment without any launcher's variables (pytest may itself run under one), plus `extra`."""
    launcher = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID", "ACCELERATE_USE_FSDP",
                "ACCELERATE_USE_DEEPSPEED")  # fmt: skip
    return {k: v for k, v in os.environ.items() if k not in launcher} | (extra or {})


def accelerate_launch(config: Path, script=("-m", "loratune")) -> list[str]:
    """`accelerate launch --config_file CONFIG SCRIPT train`, as users start an FSDP or DeepSpeed run."""
    return ["-m", "accelerate.commands.launch", "--config_file", str(config), "--main_process_port", "{port}",
            *script, "train"]  # fmt: skip


class Job:
    """Runs of one training job's settings (32 examples, 4 steps of 8 examples, a checkpoint after each step)
    under a launcher, each in its folder under `folder`. A "{port}" argument becomes a free port. The examples are
    SFT rows unless `rows(n, seed)` makes others (with the `flags` their objective needs)."""

    def __init__(self, model: str, folder: Path, rows=varied_rows, flags=()):
        self.folder = folder
        self.flags = [
            "--model", model, "--epochs", "1", "--precision", "fp32", "--lora-dropout", "0",
            "--learning-rate", "1e-3", "--batch-size", "2", "--save-every-steps", "1", "--max-length", "256",
            "--train-data", write_jsonl(folder / "train.jsonl", rows(32)),
            # 2 + 1 examples: the processes' shares of the validation set differ
            "--val-data", write_jsonl(folder / "val.jsonl", rows(3, seed=1)),
            *flags,
        ]  # fmt: skip

    def args(self, name: str, launcher: list[str], *extra: str) -> list[str]:
        launcher = [str(free_port()) if a == "{port}" else a for a in launcher]
        return [sys.executable, *launcher, *self.flags, "--output-dir", str(self.folder / name), *extra]

    def run(self, name: str, launcher: list[str], *extra: str, env=None, expect: int | None = 0):
        """(the finished process, its run folder); its exit code must be `expect` unless that is None."""
        result = subprocess.run(
            self.args(name, launcher, *extra), capture_output=True, text=True, env=environment(env), timeout=600
        )
        if expect is not None:
            assert result.returncode == expect, result.stderr[-3000:]
        return result, self.folder / name


def relative_difference(a: Path, b: Path) -> float:
    """The largest relative difference of the two adapters' tensors (their names must match)."""
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert x.keys() == y.keys()
    return max(float((x[k] - y[k]).norm() / x[k].norm()) for k in x)


def train_lines(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["event"] == "train"]


def train_steps(run: Path) -> list[int]:
    return [r["step"] for r in train_lines(run)]


def assert_same_steps(one: Path, other: Path) -> None:
    """The same steps, logged once each, with the same gradient norms: AdamW's update hardly changes when all
    gradients are scaled alike (summed over processes instead of averaged), their norm does."""
    a, b = train_lines(one), train_lines(other)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, len(a) + 1))
    for x, y in zip(a, b):
        assert abs(x["grad_norm"] - y["grad_norm"]) <= 1e-4 * x["grad_norm"], (x, y)
        assert x["tokens"] == y["tokens"]


def assert_loads_with_peft(adapter: Path) -> None:
    """peft.PeftModel.from_pretrained loads the adapter folder onto its base, with the weights of its file."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = json.loads((adapter / "adapter_config.json").read_text())
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]), adapter)
    saved = load_file(adapter / "adapter_model.safetensors")
    loaded = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)


def assert_plan_equals_run(job: Job, run: Path, *plan_flags: str) -> None:
    """`loratune plan --json` with the run's own flags resolves the run training wrote to resolved.json."""
    import contextlib
    import io

    from loratune.cli import main

    out = io.StringIO()
    flags = job.args(run.name, [])[1:]  # the job's settings and the run's folder, without the launcher
    with contextlib.redirect_stdout(out):
        assert main(["plan", *flags, *plan_flags, "--json"]) == 0
    assert json.loads(out.getvalue())["resolved"] == json.loads((run / "resolved.json").read_text())
