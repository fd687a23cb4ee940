"""Data-parallel training as users launch it, on the default device (no --device flag): `--num-processes`,
`accelerate launch --multi_gpu` and torchrun, on one node and on two (loopback). Each 2-process run must give the
adapter of one process accumulating twice as long, and a launch whose processes do not all join one job must stop
in one line before loading any weights."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import varied_rows, write_jsonl
from safetensors.torch import load_file

DRIVER = str(Path(__file__).with_name("fault_driver.py"))
TWO_PROCESSES = "engine: DDP, 2 processes on 1 node, backend gloo, device cpu"
LAUNCHERS = {
    "num-processes": ["-m", "loratune", "train", "--num-processes", "2"],
    "accelerate": ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "{port}",
                   "-m", "loratune", "train"],
    "torchrun": ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "loratune", "train"],
}  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(args) -> list[str]:
    return [sys.executable, *(str(free_port()) if a == "{port}" else a for a in args)]


def environment(extra=None) -> dict:
    """This environment without any launcher's variables (pytest may itself run under one), plus `extra`."""
    launcher = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID", "ACCELERATE_USE_FSDP")
    return {k: v for k, v in os.environ.items() if k not in launcher} | (extra or {})


def relative_difference(a: Path, b: Path) -> float:
    """The largest relative difference of the two adapters' tensors (their names must match)."""
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert x.keys() == y.keys()
    return max(float((x[k] - y[k]).norm() / x[k].norm()) for k in x)


def train_steps(run: Path) -> list[int]:
    lines = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [r["step"] for r in lines if r["event"] == "train"]


@pytest.fixture(scope="module")
def job(tiny_model, tmp_path_factory):
    """The settings of every run here: 32 examples, 4 steps of 8; runs are started by `job.run`."""
    root = tmp_path_factory.mktemp("distributed")
    flags = [
        "--model", tiny_model, "--epochs", "1", "--precision", "fp32", "--lora-dropout", "0",
        "--learning-rate", "1e-3", "--batch-size", "2", "--save-every-steps", "1", "--max-length", "256",
        "--train-data", write_jsonl(root / "train.jsonl", varied_rows(32)),
        "--val-data", write_jsonl(root / "val.jsonl", varied_rows(3, seed=1)),  # 2 + 1: the processes' shares differ
    ]  # fmt: skip

    class Job:
        folder = root

        def args(self, name, launcher, *extra):
            return command([*launcher, *flags, "--output-dir", str(root / name), *extra])

        def run(self, name, launcher, *extra, env=None, expect=0):
            result = subprocess.run(
                self.args(name, launcher, *extra), capture_output=True, text=True, env=environment(env), timeout=600
            )
            if expect is not None:
                assert result.returncode == expect, result.stderr[-3000:]
            return result, root / name

    return Job()


@pytest.fixture(scope="module")
def one_process(job):
    return job.run("one", ["-m", "loratune", "train"], "--gradient-accumulation-steps", "4")[1]


@pytest.fixture(scope="module")
def two_processes(job):
    return job.run("num-processes", LAUNCHERS["num-processes"], "--gradient-accumulation-steps", "2")


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_two_processes_equal_one_process_with_double_accumulation(job, one_process, two_processes, launcher):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if launcher == "num-processes":
        result, run = two_processes
    else:
        result, run = job.run(launcher, LAUNCHERS[launcher], "--gradient-accumulation-steps", "2")
    assert result.stdout.count(TWO_PROCESSES) == 1, result.stdout[-2000:]  # named once, by the main process
    assert "effective batch 8 = batch_size 2 x gradient_accumulation_steps 2 x 2 processes" in result.stdout
    assert train_steps(one_process) == train_steps(run) == [1, 2, 3, 4]  # once each: not a run per process
    for adapter in ("last", "adapter"):
        assert relative_difference(one_process / adapter, run / adapter) <= 1e-4

    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]), run / "adapter"
    )
    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    loaded = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_two_nodes_on_loopback_equal_one_node(job, two_processes):
    """torchrun on two "machines" (this one twice, one process each) trains as one node with two processes."""
    port = str(free_port())
    nodes = [
        subprocess.Popen(
            job.args("two-nodes", ["-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", rank,
                                   "--nproc-per-node", "1", "--rdzv-endpoint", f"127.0.0.1:{port}",
                                   "-m", "loratune", "train"], "--gradient-accumulation-steps", "2"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment(),
        )
        for rank in ("0", "1")
    ]  # fmt: skip
    outputs = [node.communicate(timeout=600) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert "engine: DDP, 2 processes on 2 nodes, backend gloo, device cpu" in outputs[0][0]
    run = job.folder / "two-nodes"
    assert train_steps(run) == [1, 2, 3, 4]
    assert relative_difference(two_processes[1] / "last", run / "last") <= 1e-4


def test_killed_mid_epoch_then_resumed_gives_the_uninterrupted_adapter(job, two_processes):
    """SIGKILL of both processes in the middle of the epoch (their 3rd pass: step 2 or 3 of 4), then --resume."""
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", DRIVER, "train"]
    result, run = job.run("killed", torchrun, "--gradient-accumulation-steps", "2", env={"FAULT": "kill_at_pass:3"},
                          expect=None)  # fmt: skip
    assert result.returncode != 0 and not (run / "summary.json").exists()
    assert (run / "checkpoints").is_dir() and train_steps(run)[-1] < 4
    result, run = job.run("killed", LAUNCHERS["num-processes"], "--gradient-accumulation-steps", "2", "--resume")
    assert "resuming from" in result.stdout
    assert train_steps(run) == [1, 2, 3, 4]  # none logged twice
    assert relative_difference(two_processes[1] / "last", run / "last") <= 1e-6


BLIND_ACCELERATE = """
import sys, accelerate
joined = accelerate.Accelerator
accelerate.Accelerator = lambda cpu, **kw: joined(cpu=False, **kw)  # as before the fix: each process alone on a CPU
from loratune.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="breaks the detection as it failed on machines without a GPU")
def test_a_launch_whose_processes_do_not_join_refuses_in_one_line(job, tmp_path):
    blind = tmp_path / "blind.py"
    blind.write_text(BLIND_ACCELERATE)
    result, run = job.run("blind", ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(blind),
                                    "train"], expect=None)  # fmt: skip
    refusals = [line for line in result.stderr.splitlines() if "the launcher started 2 processes" in line]
    assert result.returncode != 0 and len(refusals) == 1, result.stderr[-2000:]
    assert refusals[0].startswith("error: WORLD_SIZE=2: ") and "each would train alone" in refusals[0]
    assert not run.exists()  # stopped before anything was written (or loaded)

    env = {"SLURM_NTASKS": "2", "SLURM_PROCID": "0"}  # srun started two tasks without a launcher
    result, run = job.run("slurm", ["-m", "loratune", "train"], env=env, expect=2)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and not run.exists(), result.stderr[-2000:]
    assert errors[0].startswith("error: SLURM_NTASKS=2: ") and "one `torchrun`" in errors[0]

    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}  # as an accelerate config asking for FSDP1 sets it
    result, run = job.run("fsdp1", LAUNCHERS["num-processes"], env=env, expect=2)
    assert result.stderr.strip().splitlines() == [
        "error: the accelerate config asks for FSDP version 1; loratune runs FSDP2: set fsdp_version: 2 under "
        "fsdp_config"
    ]  # one line: the other process stays silent and torchrun's own report is left out
