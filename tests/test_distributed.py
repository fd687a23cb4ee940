"""Data-parallel training as users launch it, on the default device (no --device flag): `--num-processes`,
`accelerate launch --multi_gpu` and torchrun, on one node and on two (loopback). Each 2-process run must give the
adapter of one process accumulating twice as long, and a launch whose processes do not all join one job must stop
in one line before loading any weights."""

import subprocess

import pytest
import torch
from distributed_runs import (
    DRIVER,
    ONE,
    Job,
    assert_loads_with_peft,
    assert_plan_equals_run,
    assert_same_steps,
    environment,
    free_port,
    relative_difference,
    train_steps,
)

TWO_PROCESSES = "engine: DDP, 2 processes on 1 node, backend gloo, device cpu"
LAUNCHERS = {
    "num-processes": ["-m", "loratune", "train", "--num-processes", "2"],
    "accelerate": ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "{port}",
                   "-m", "loratune", "train"],
    "torchrun": ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "loratune", "train"],
}  # fmt: skip


@pytest.fixture(scope="module")
def job(tiny_model, tmp_path_factory):
    return Job(tiny_model, tmp_path_factory.mktemp("distributed"))


@pytest.fixture(scope="module")
def one_process(job):
    return job.run("one", ONE, "--gradient-accumulation-steps", "4")[1]


@pytest.fixture(scope="module")
def two_processes(job):
    return job.run("num-processes", LAUNCHERS["num-processes"], "--gradient-accumulation-steps", "2")


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_two_processes_equal_one_process_with_double_accumulation(job, one_process, two_processes, launcher):
    if launcher == "num-processes":
        result, run = two_processes
    else:
        result, run = job.run(launcher, LAUNCHERS[launcher], "--gradient-accumulation-steps", "2")
    assert result.stdout.count(TWO_PROCESSES) == 1, result.stdout[-2000:]  # named once, by the main process
    assert "effective batch 8 = batch_size 2 x gradient_accumulation_steps 2 x 2 processes" in result.stdout
    assert_same_steps(one_process, run)  # each step once (not a run per process), the same gradients
    for adapter in ("last", "adapter"):
        assert relative_difference(one_process / adapter, run / adapter) <= 1e-4
    if launcher == "num-processes":
        assert_plan_equals_run(job, run, "--gradient-accumulation-steps", "2", "--num-processes", "2")
        assert_plan_equals_run(job, one_process, "--gradient-accumulation-steps", "4")

    assert_loads_with_peft(run / "adapter")


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
    assert_same_steps(two_processes[1], run)
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
    result, run = job.run("slurm", ONE, env=env, expect=2)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and not run.exists(), result.stderr[-2000:]
    assert errors[0].startswith("error: SLURM_NTASKS=2: ") and "one `torchrun`" in errors[0]

    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}  # as an accelerate config asking for FSDP1 sets it
    result, run = job.run("fsdp1", LAUNCHERS["num-processes"], env=env, expect=2)
    assert result.stderr.strip().splitlines() == [
        "error: the accelerate config asks for FSDP version 1; loratune runs FSDP2: set fsdp_version: 2 under "
        "fsdp_config"
    ]  # one line: the other process stays silent and torchrun's own report is left out


def test_out_of_memory_with_two_processes_stops_with_the_fixes(job, tiny_model):
    """A pass over max_memory (simulated on a CPU as a capped GPU raises it) is not replayed at half the micro-batch
    with several processes: the run stops with the fixes, and the launcher stops the other process."""
    from loratune import TrainConfig
    from loratune.data.encode import encoder_for
    from loratune.data.plan import plan_for
    from loratune.data.prepare import prepare
    from loratune.memory.arithmetic import MemoryModel
    from loratune.memory.planner import Budget, largest_pass, peak_items
    from loratune.memory.shape import read_shape
    from loratune.modeling.model import load_tokenizer

    cfg = TrainConfig(
        model=tiny_model, train_data=str(job.folder / "train.jsonl"), max_length=256, precision="fp32", device="cpu",
        lora_dropout=0.0, batch_size=4, gradient_accumulation_steps=1,
    )  # fmt: skip
    data = prepare(cfg, encoder_for(load_tokenizer(tiny_model), cfg)).train
    mm = MemoryModel.for_run(cfg, read_shape(tiny_model, cfg), "cpu", torch.float32)
    plan = plan_for(cfg, data.lengths, data.target_counts, packing=True, processes=2)

    def peak(b):
        return peak_items(mm, largest_pass(mm, plan.with_micro_batch(b)), Budget(2**40, "plenty"))[1]

    cap = str((peak(1) + peak(4)) // 2)
    result, run = job.run("oom", LAUNCHERS["num-processes"], "--batch-size", "4", "--gradient-accumulation-steps", "1",
                          "--max-memory", cap, expect=1)  # fmt: skip
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: out of memory at batch_size 4")]
    # each process that ran out says so, in one line: here both, at the same pass
    assert errors and set(errors) == {errors[0]}, result.stderr[-3000:]
    assert "With 2 processes the micro-batch is not made smaller" in errors[0]
    assert "batch_size 1 with gradient_accumulation_steps 4" in errors[0]  # a fix that keeps the effective batch
    assert "with 2 processes training stops when memory runs out" in result.stdout  # warned before training
    assert "Traceback" not in result.stderr
