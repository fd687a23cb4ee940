"""DeepSpeed ZeRO-2 and ZeRO-3 as users launch them: `accelerate launch --config_file ds.yaml` with an accelerate
DeepSpeed config, here on 2 CPU processes with gloo. DeepSpeed's engine runs each step's passes and one update per
step; its split optimizer state (and ZeRO-3's split weights) are saved whole, as the other engines save them.

The comparison with one process catches what DeepSpeed's own loop would do to loratune's steps: the loss divided
again by DeepSpeed's accumulation steps, an update at its own accumulation boundary rather than at the end of the
step, its clipping or the processes' gradients summed instead of averaged; the resumed run catches AdamW's split
state lost or misplaced (DeepSpeed creates it at the first update, after the checkpoint is loaded)."""

import json
import shutil

import pytest
from distributed_runs import (
    DRIVER,
    ONE,
    Job,
    accelerate_launch,
    assert_loads_with_peft,
    assert_plan_equals_run,
    assert_same_steps,
    relative_difference,
    train_steps,
)

ZERO = """compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
num_machines: 1
num_processes: 2
mixed_precision: 'no'
deepspeed_config:
  zero_stage: {stage}
  gradient_accumulation_steps: 1
  gradient_clipping: 1.0
  offload_optimizer_device: none
  offload_param_device: none
  zero3_init_flag: {zero3_init}
"""


@pytest.fixture(scope="module")
def job(tiny_model, tmp_path_factory):
    job = Job(tiny_model, tmp_path_factory.mktemp("zero"))
    for stage in (2, 3):
        (job.folder / f"zero{stage}.yaml").write_text(ZERO.format(stage=stage, zero3_init=str(stage == 3).lower()))
    return job


@pytest.fixture(scope="module")
def one(job):
    return job.run("one", ONE, "--gradient-accumulation-steps", "4")[1]


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def zero(job, request):
    """(stage, the finished run, its folder) of an uninterrupted 2-process run."""
    stage = request.param
    result, run = job.run(
        f"zero{stage}", accelerate_launch(job.folder / f"zero{stage}.yaml"), "--gradient-accumulation-steps", "2"
    )
    return stage, result, run


def test_zero_on_two_processes_equals_one_process(job, one, zero):
    stage, result, run = zero
    out = result.stdout
    assert out.count(f"engine: ZeRO-{stage}, 2 processes on 1 node, backend gloo, device cpu") == 1, out[-2000:]
    if stage == 3:  # the tiny model's weights split evenly: each process holds half of everything
        assert "ZeRO-3: this process holds 11,264 of the 22,528 trainable parameters" in out
        assert "105,632 of all 211,264" in out
    assert_same_steps(one, run)
    for adapter in ("last", "adapter"):
        assert relative_difference(one / adapter, run / adapter) <= 1e-4
    assert_loads_with_peft(run / "adapter")
    if stage == 3:  # `loratune plan --zero3`; a ZeRO-2 device is planned as a DDP one
        assert_plan_equals_run(job, run, "--gradient-accumulation-steps", "2", "--num-processes", "2", "--zero3")


def test_zero_killed_mid_epoch_then_resumed_gives_the_uninterrupted_adapter(job, one, zero):
    """SIGKILL of both processes at their 3rd pass (step 2 or 3 of 4); the resumed run writes each process's slices
    of the whole adapter and AdamW state back, and ends where the uninterrupted run did. The checkpoint holds whole
    tensors: one process without DeepSpeed resumes it too, and ends where one process did."""
    stage = zero[0]
    config = job.folder / f"zero{stage}.yaml"
    name = f"killed{stage}"
    args = ("--gradient-accumulation-steps", "2")
    result, run = job.run(
        name, accelerate_launch(config, [DRIVER]), *args, env={"FAULT": "kill_at_pass:3"}, expect=None
    )
    assert result.returncode != 0 and not (run / "summary.json").exists()
    assert train_steps(run)[-1] < 4
    shutil.copytree(run, job.folder / f"{name}-one")
    result, alone = job.run(f"{name}-one", ONE, "--gradient-accumulation-steps", "4", "--resume")
    assert "resuming from" in result.stdout and "engine: single process" in result.stdout
    assert relative_difference(one / "last", alone / "last") <= 1e-4
    result, run = job.run(name, accelerate_launch(config), *args, "--resume")
    assert "resuming from" in result.stdout
    assert train_steps(run) == [1, 2, 3, 4]
    assert relative_difference(zero[2] / "last", run / "last") <= 1e-6


def test_zero_stop_between_two_passes_finishes_the_step_then_saves_and_resumes(job, zero):
    """SIGINT to both processes before their 3rd pass, the first of the two each runs in step 3: a step's gradients
    so far are spread over the processes' slices under ZeRO, so the step is finished, not cut, before the checkpoint;
    the resumed run ends where the uninterrupted one did."""
    stage = zero[0]
    config, name, args = job.folder / f"zero{stage}.yaml", f"stopped{stage}", ("--gradient-accumulation-steps", "2")
    env = {"FAULT": "signal_at_pass:3:INT"}
    result, run = job.run(name, accelerate_launch(config, [DRIVER]), *args, env=env, expect=None)
    assert result.returncode != 0 and f"SIGINT: checkpoint saved. Resume with: loratune train --resume {run}" in (
        result.stderr
    ), result.stderr[-2000:]
    saved = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert saved and all("." not in p for p in saved)  # whole steps only
    result, run = job.run(name, accelerate_launch(config), *args, "--resume")
    assert train_steps(run) == [1, 2, 3, 4]
    assert relative_difference(zero[2] / "last", run / "last") <= 1e-6


def test_a_one_process_checkpoint_resumes_under_zero3(job, one):
    """The reverse of the above: one process without DeepSpeed killed mid-epoch, resumed by 2 ZeRO-3 processes
    (each takes its slices of the whole adapter and AdamW state), ends where one process did."""
    args = ("--gradient-accumulation-steps", "4")
    result, run = job.run("one-killed", [DRIVER, "train"], *args, env={"FAULT": "kill_at_pass:5"}, expect=None)
    assert result.returncode != 0 and 1 <= train_steps(run)[-1] < 4
    result, run = job.run("one-killed", accelerate_launch(job.folder / "zero3.yaml"), "--gradient-accumulation-steps",
                          "2", "--resume")  # fmt: skip
    assert "resuming from" in result.stdout and "engine: ZeRO-3" in result.stdout
    assert relative_difference(one / "last", run / "last") <= 1e-4


@pytest.mark.parametrize(
    "env, refusal",
    [
        ({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, None),
        ({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"}, "loratune runs ZeRO stage 2 or 3"),
        ({"ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"}, "offload_optimizer: loratune does not offload"),
        ({"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}, "set loratune's gradient_accumulation_steps instead"),
        (
            {"ACCELERATE_DEEPSPEED_CONFIG_FILE": "{optimizer}"},
            "the DeepSpeed config sets an optimizer: loratune uses its own AdamW",
        ),
        ({"ACCELERATE_DEEPSPEED_CONFIG_FILE": "{bf16}"}, "the DeepSpeed config enables bf16"),
    ],
)
def test_the_deepspeed_settings_loratune_runs_or_a_refusal(monkeypatch, tmp_path, env, refusal):
    """As `accelerate launch --config_file` sets the environment (or points to a DeepSpeed config file)."""
    from loratune.training.engine import launch as engine

    files = {
        "{optimizer}": {"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}},
        "{bf16}": {"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}},
    }
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    for name, value in env.items():
        if value in files:
            (tmp_path / "ds.json").write_text(json.dumps(files[value]))
            value = str(tmp_path / "ds.json")
        monkeypatch.setenv(name, value)
    if refusal is None:
        assert engine._requested_sharding() == ("ZeRO-3", True)
    else:
        with pytest.raises(engine.LaunchRefused, match=refusal):
            engine._requested_sharding()


def test_deepspeed_not_installed_is_refused_with_the_extra_to_install(monkeypatch):
    import importlib.util

    from loratune.training.engine import launch as engine

    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else find(name, *a))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(engine.LaunchRefused, match=r"not installed: pip install 'loratune\[deepspeed\]'"):
        engine._requested_sharding()
