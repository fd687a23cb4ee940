"""FSDP2 as users launch it: `accelerate launch --config_file fsdp.yaml` (fsdp_version: 2), here on 2 CPU
processes with gloo. The frozen base, the adapter, its gradients and AdamW state are sharded; saving gathers the
adapter alone into PEFT's folder, and resuming hands each process its shard back.

The comparison with one process catches the known traps of LoRA under FSDP2: only rank 0's slice of the adapter
saved, so that a resumed run lost the other half (accelerate PR #4206), and gloo summing the processes' gradients
instead of averaging them (pytorch issue #162338)."""

import json

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

FSDP2 = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
num_processes: 2
mixed_precision: 'no'
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_reshard_after_forward: true
"""


@pytest.fixture(scope="module")
def job(tiny_model, tmp_path_factory):
    job = Job(tiny_model, tmp_path_factory.mktemp("fsdp"))
    (job.folder / "fsdp.yaml").write_text(FSDP2)
    return job


def launcher(job, script=("-m", "loratune")):
    return accelerate_launch(job.folder / "fsdp.yaml", script)


@pytest.fixture(scope="module")
def fsdp(job):
    return job.run("fsdp", launcher(job), "--gradient-accumulation-steps", "2")


def test_fsdp2_on_two_processes_equals_one_process(job, fsdp):
    one = job.run("one", ONE, "--gradient-accumulation-steps", "4")[1]
    result, run = fsdp
    out = result.stdout
    assert out.count("engine: FSDP2, 2 processes on 1 node, backend gloo, device cpu") == 1, out[-2000:]
    # the tiny model's every weight splits evenly: each process holds half of everything
    assert "FSDP2: this process holds 11,264 of the 22,528 trainable parameters" in out
    assert "105,632 of all 211,264" in out
    assert_same_steps(one, run)
    for adapter in ("last", "adapter"):  # gathered whole, averaged gradients: the one-process adapter
        assert relative_difference(one / adapter, run / adapter) <= 1e-4
    assert_plan_equals_run(job, run, "--gradient-accumulation-steps", "2", "--num-processes", "2", "--fsdp")
    assert_loads_with_peft(run / "adapter")


def test_fsdp2_killed_mid_epoch_then_resumed_gives_the_uninterrupted_adapter(job, fsdp):
    """SIGKILL of both processes at their 3rd pass (step 2 or 3 of 4); the resumed run loads the whole adapter and
    AdamW state from the checkpoint, each process its shard, and ends where the uninterrupted run did."""
    env = {"FAULT": "kill_at_pass:3"}
    result, run = job.run("killed", launcher(job, [DRIVER]), "--gradient-accumulation-steps", "2", env=env, expect=None)
    assert result.returncode != 0 and not (run / "summary.json").exists()
    assert train_steps(run)[-1] < 4
    result, run = job.run("killed", launcher(job), "--gradient-accumulation-steps", "2", "--resume")
    assert "resuming from" in result.stdout
    assert train_steps(run) == [1, 2, 3, 4]
    assert relative_difference(fsdp[1] / "last", run / "last") <= 1e-6


@pytest.mark.parametrize("flag, engine", [("--fsdp", "FSDP2"), ("--zero3", "ZeRO-3")])
def test_plan_for_fsdp_shows_one_devices_shards_and_batch_size_auto_uses_them(tmp_path, capsys, flag, engine):
    """A 7B Llama (its config alone: plans load no weights) on 24 GB GPUs: with FSDP2 (or DeepSpeed's ZeRO-3, see
    tests/test_zero.py) over 4 processes a device holds a quarter of the frozen weights and of AdamW's state, and
    batch_size auto takes the room that frees."""
    from transformers import LlamaConfig

    from loratune.cli import main

    LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=4096,
    ).save_pretrained(tmp_path)  # fmt: skip
    args = ["plan", "--model", str(tmp_path), "--gpu-memory", "24GB", "--max-length", "2048", "--batch-size", "auto",
            "--gradient-checkpointing", "--tokens-per-second", "1000", "--num-processes", "4", "--json"]  # fmt: skip
    plans = {}
    for name, extra in (("ddp", []), ("fsdp", [flag])):
        assert main(args + extra) == 0
        plans[name] = json.loads(capsys.readouterr().out)
    ddp, fsdp = plans["ddp"], plans["fsdp"]
    assert ddp["device"].endswith("one of 4 data-parallel processes")
    assert fsdp["device"].endswith(f"one of 4 processes with {engine} (weights and optimizer state sharded)")
    assert fsdp["items"]["frozen weights (bf16), a 1/4 shard"] == ddp["items"]["frozen weights (bf16)"] // 4
    assert fsdp["items"]["AdamW state (2 x fp32), a 1/4 shard"] == ddp["items"]["AdamW state (2 x fp32)"] // 4
    assert fsdp["fits"] and ddp["fits"] and fsdp["batch_size"] > ddp["batch_size"]


@pytest.mark.parametrize(
    "env, refusal",
    [
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "asks for FSDP version 1; loratune runs FSDP2"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "true"}, "fsdp_offload_params"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "false"}, None),
    ],
)
def test_the_engine_is_the_one_the_accelerate_config_asks_for_or_a_refusal(monkeypatch, env, refusal):
    """As `accelerate launch --config_file` sets the environment; never silently another engine."""
    from loratune.training.engine import launch as engine

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if refusal is None:
        assert engine._requested_sharding() == ("FSDP2", False)
    else:
        with pytest.raises(engine.LaunchRefused, match=refusal):
            engine._requested_sharding()
