import json
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import varied_rows, write_jsonl
from safetensors.torch import load_file

from loratune import TrainConfig, train
from loratune.core.errors import UserError
from loratune.modeling import loss
from loratune.training.run_folder import check_output_dir

DRIVER = str(Path(__file__).with_name("fault_driver.py"))


@pytest.fixture
def data(tmp_path):
    return (
        write_jsonl(tmp_path / "train.jsonl", varied_rows(36)),
        write_jsonl(tmp_path / "val.jsonl", varied_rows(4, seed=1)),
    )


def _settings(model, data, out, **extra) -> dict:
    # Unpacked, every step takes 3 passes, so a pass number names a point in a step; packed runs take fewer.
    return (
        dict(
            model=model,
            train_data=data[0],
            val_data=data[1],
            output_dir=out,
            epochs=2,
            batch_size=2,
            gradient_accumulation_steps=3,
            save_every_steps=1,
            lora_dropout=0.1,
            precision="fp32",
            device="cpu",
            learning_rate=1e-3,
            keep_checkpoints=2,
            packing=False,
        )
        | extra
    )


def _flags(model, data, out, **extra):
    return [f"--{k.replace('_', '-')}={v}" for k, v in _settings(model, data, out, **extra).items()]


def _run(flags, fault="", resume=False):
    args = [sys.executable, DRIVER, "train", *flags] + (["--resume"] if resume else [])
    return subprocess.run(args, capture_output=True, text=True, env={**__import__("os").environ, "FAULT": fault})


def _same(a: Path, b: Path):
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(x[k], y[k], atol=1e-6, rtol=1e-6)


def test_sigkill_at_random_points_then_resume_gives_the_uninterrupted_adapter(tiny_model, data, tmp_path):
    reference = tmp_path / "reference"
    assert _run(_flags(tiny_model, data, reference)).returncode == 0  # 12 steps of 3 passes

    rng = random.Random(7)  # pass and save numbers count from the start of each (resumed) process
    faults = [
        f"kill_at_pass:{3 * rng.randint(1, 2) + 2}",  # mid-accumulation (the 2nd pass of a step)
        f"kill_in_save:{rng.randint(1, 2)}",  # mid-save
        f"kill_at_pass:{3 * rng.randint(1, 2) + 1}",  # at a step boundary
        f"kill_at_pass:{3 * rng.randint(1, 2) + 3}",  # mid-accumulation (the last pass of a step)
        f"kill_in_save:{rng.randint(1, 3)}",
    ]
    run = tmp_path / "run"
    for i, fault in enumerate(faults):
        result = _run(_flags(tiny_model, data, run), fault, resume=i > 0)
        assert result.returncode == -signal.SIGKILL, (fault, result.stderr[-1500:])
    result = _run(_flags(tiny_model, data, run), resume=True)
    assert result.returncode == 0, result.stderr[-1500:]
    assert "resuming from" in result.stdout
    _same(run / "last", reference / "last")
    _same(run / "adapter", reference / "adapter")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 12
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m["event"] == "train"] == list(range(1, 13))  # no step logged twice
    assert not list((run / "checkpoints").glob(".*")), "leftovers of interrupted saves were not cleaned up"


def _mid_step_pass(model, data, packing: bool) -> tuple[int, str]:
    """The number of a training pass that is not the last of its step (after step 2), and the checkpoint a stop
    after it saves, from the passes training will make."""
    from loratune.data.encode import encoder_for
    from loratune.data.plan import StepPlan
    from loratune.data.prepare import prepare
    from loratune.modeling.model import load_tokenizer

    cfg = TrainConfig(**_settings(model, data, "unused", packing=packing))
    train_set = prepare(cfg, encoder_for(load_tokenizer(model), cfg)).train
    plan, done = StepPlan(train_set.lengths, train_set.target_counts, 6, 2, packing, seed=cfg.seed), 0
    for step, examples in enumerate(plan.epoch(0)):
        n = len(plan.passes(examples))
        if step >= 2 and n > 1:
            return done + 1, f"step-{step:06d}.1"
        done += n
    raise AssertionError("no step of the first epoch takes two passes")


@pytest.mark.parametrize("sig, packing", [("INT", False), ("TERM", True)])
def test_signal_saves_mid_step_and_resume_is_exact(tiny_model, data, tmp_path, sig, packing):
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert _run(_flags(tiny_model, data, reference, packing=packing)).returncode == 0
    at, saved = _mid_step_pass(tiny_model, data, packing)
    result = _run(_flags(tiny_model, data, run, packing=packing), f"signal_at_pass:{at}:{sig}")
    assert result.returncode == 128 + getattr(signal, f"SIG{sig}"), result.stderr[-1500:]  # 130 or 143, as the shell's
    assert f"SIG{sig}: checkpoint saved. Resume with: loratune train --resume {run}" in result.stderr
    assert (run / "checkpoints" / saved / "partial_grads.pt").is_file()
    assert _run(_flags(tiny_model, data, run, packing=packing), resume=True).returncode == 0
    _same(run / "last", reference / "last")


def test_second_ctrl_c_stops_at_once(tiny_model, data, tmp_path):
    result = _run(_flags(tiny_model, data, tmp_path / "run"), "signal_at_pass:5:INT2")
    assert result.returncode == 130 and "stopped." in result.stderr


def test_early_stopping_keeps_the_best_adapter(tiny_model, tmp_path):
    def rows(n, seed):
        return [
            {
                "input": " ".join(random.Random(seed + i).choices("abcdefghij", k=6)),
                "output": " ".join(random.Random(seed - i).choices("klmnopqrst", k=8)),
            }
            for i in range(n)
        ]

    cfg = TrainConfig(
        model=tiny_model,
        train_data=write_jsonl(tmp_path / "t.jsonl", rows(8, 0)),
        val_data=write_jsonl(tmp_path / "v.jsonl", rows(8, 100)),
        output_dir=str(tmp_path / "run"),
        epochs=60,
        batch_size=4,
        gradient_accumulation_steps=1,
        learning_rate=2e-2,
        warmup_ratio=0,
        lr_scheduler="constant",
        lora_dropout=0.0,
        precision="fp32",
        device="cpu",
        keep_checkpoints=1,
    )
    summary = train(cfg)
    assert summary["stop_reason"].startswith("early stopping") and summary["steps"] < 120
    assert summary["best_step"] < summary["steps"] and summary["best_val_loss"] < summary["last_val_loss"]
    run = tmp_path / "run"
    best = run / "checkpoints" / f"step-{summary['best_step']:06d}"
    assert best.is_dir(), "the best checkpoint was pruned"
    _same(run / "adapter", best / "adapter")


def test_nan_updates_are_skipped_then_training_stops_with_a_diagnosis(tiny_model, data, tmp_path, monkeypatch):
    forward, calls = loss.CausalLMLoss.forward, {"n": 0}

    def poisoned(self, batch, when):
        calls["n"] += self.training
        value = forward(self, batch)
        return value * float("nan") if self.training and when(calls["n"]) else value

    cfg = TrainConfig(
        model=tiny_model,
        train_data=data[0],
        val_data=data[1],
        output_dir=str(tmp_path / "a"),
        epochs=1,
        batch_size=2,
        gradient_accumulation_steps=3,
        precision="fp32",
        device="cpu",
    )
    monkeypatch.setattr(loss.CausalLMLoss, "forward", lambda s, b: poisoned(s, b, lambda n: n in (4, 8)))
    summary = train(cfg)  # two poisoned steps are skipped, the run finishes with a finite adapter
    assert summary["nonfinite_steps"] == 2
    assert all(torch.isfinite(t).all() for t in load_file(tmp_path / "a/last/adapter_model.safetensors").values())

    calls["n"] = 0
    monkeypatch.setattr(loss.CausalLMLoss, "forward", lambda s, b: poisoned(s, b, lambda n: n > 6))
    with pytest.raises(UserError) as e:
        train(cfg.model_copy(update={"output_dir": str(tmp_path / "b"), "max_nonfinite_steps": 3}))
    assert "3 updates in a row had a NaN or infinite loss" in str(e.value) and "learning_rate=0.0002" in str(e.value)
    assert "train.jsonl line" in str(e.value)  # the examples involved
    assert not (tmp_path / "b" / "last").exists()


def test_refuses_an_existing_run_unless_overwrite_or_resume(tiny_model, data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "something").write_text("x")
    result = _run(_flags(tiny_model, data, out))
    assert result.returncode == 2 and "already holds a run. Use --resume" in result.stderr
    assert (out / "something").is_file()


def test_overwrite_replaces_only_loratune_output(tiny_model, data, tmp_path, monkeypatch):
    folder = Path(data[0]).parent  # the training data's own folder, given as output_dir by mistake
    before = sorted(p.name for p in folder.iterdir())
    result = _run(_flags(tiny_model, data, folder) + ["--overwrite"])
    assert result.returncode == 2 and "holds files loratune did not write (" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and sorted(p.name for p in folder.iterdir()) == before

    run = tmp_path / "old-run"
    for name in ("adapter", "checkpoints"):
        (run / name).mkdir(parents=True)
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "eval-test.jsonl",
        ".summary.json.tmp-1",
        "adapter/adapter_config.json",
    ):
        (run / name).write_text("x")
    check_output_dir(run, overwrite=True, resume=False)  # a run's own files: may be replaced
    monkeypatch.chdir(run / "adapter")
    for below_or_at in (run, run / "adapter"):
        with pytest.raises(UserError, match="is the working folder or contains it"):
            check_output_dir(below_or_at, overwrite=True, resume=False)


def test_resume_refuses_changed_data_or_config(tiny_model, data, tmp_path):
    run = tmp_path / "run"
    assert _run(_flags(tiny_model, data, run)).returncode == 0
    result = _run(_flags(tiny_model, data, run, lora_r=16), resume=True)
    assert result.returncode == 2 and "the config changed (lora_r: 8 -> 16)" in result.stderr
    Path(data[0]).write_text(Path(data[0]).read_text().replace("mugs", "cups"))
    result = _run(_flags(tiny_model, data, run), resume=True)
    assert result.returncode == 2 and "train_data changed since the run started" in result.stderr


def test_output_dir_that_cannot_be_written(tiny_model, data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = _run(_flags(tiny_model, data, blocker / "run"))
    assert result.returncode == 2 and result.stderr.startswith("error: cannot write")


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tiny_model, data, tmp_path, monkeypatch):
    import errno

    from loratune.training import checkpoint

    real, calls = checkpoint.torch.save, {"n": 0}

    def full(obj, path, *a, **k):
        calls["n"] += 1
        if calls["n"] > 6:  # the first two checkpoints (3 files each) fit, the third does not
            raise OSError(errno.ENOSPC, "No space left on device")
        real(obj, path, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", full)
    cfg = TrainConfig(
        model=tiny_model,
        train_data=data[0],
        val_data=data[1],
        output_dir=str(tmp_path / "run"),
        epochs=1,
        batch_size=2,
        gradient_accumulation_steps=3,
        save_every_steps=1,
        precision="fp32",
        device="cpu",
    )
    with pytest.raises(UserError, match="disk full while writing .*step-000003"):
        train(cfg)
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step-000001", "step-000002"]  # no half-written third
