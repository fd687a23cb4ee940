import importlib.util

import pytest

from loratune import TrainConfig
from loratune.core.errors import UserError
from loratune.training.tracking import Trackers


def _scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder)).Reload()
    return {tag: [(e.step, round(e.value, 6)) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_gets_metrics_config_and_summary_and_a_resume_replaces_replayed_steps(tmp_path):
    config = TrainConfig(train_data="data.jsonl").model_dump()
    trackers = Trackers(["tensorboard"])
    trackers.start(tmp_path, config)
    for step in (1, 2, 3):
        trackers.log({"event": "train", "step": step, "epoch": step / 3, "loss": 1.0 / step, "lr": 1e-4})
    trackers.log({"event": "eval", "step": 3, "val_loss": 0.5, "best_val_loss": 0.5})
    trackers.finish()

    resumed = Trackers(["tensorboard"])  # resumed from the checkpoint at step 1: steps 2 and 3 run again
    resumed.start(tmp_path, config, step=1)
    for step in (2, 3):
        resumed.log({"event": "train", "step": step, "epoch": step / 3, "loss": 2.0 / step, "lr": 1e-4})
    resumed.log({"event": "eval", "step": 3, "val_loss": 0.25, "best_val_loss": 0.25})
    resumed.finish({"steps": 3, "best_val_loss": 0.25, "test_after": {"exact_match": 0.5, "samples": ["x"]}})

    scalars = _scalars(tmp_path / "tensorboard")
    assert scalars["train/loss"] == [(1, 1.0), (2, 1.0), (3, 0.666667)]
    assert scalars["eval/val_loss"] == [(3, 0.25)]
    assert scalars["summary/best_val_loss"] == [(3, 0.25)] and scalars["summary/test_after/exact_match"] == [(3, 0.5)]
    assert list(tmp_path.glob("tensorboard/*/hparams.yml"))  # the config, as TensorBoard hyperparameters


def test_a_missing_tracker_package_is_one_clear_error_before_anything_starts(tmp_path):
    if importlib.util.find_spec("wandb"):
        pytest.skip("wandb is installed here")
    with pytest.raises(UserError, match=r"report_to: wandb needs the wandb package.*pip install 'loratune\[wandb\]'"):
        Trackers(["tensorboard", "wandb"])
    assert not list(tmp_path.iterdir())


def test_training_with_report_to_tensorboard_logs_every_metrics_record(tiny_model, tmp_path):
    from conftest import varied_rows, write_jsonl

    from loratune import train

    run = tmp_path / "run"
    summary = train(
        TrainConfig(
            model=tiny_model,
            train_data=write_jsonl(tmp_path / "train.jsonl", varied_rows(16)),
            val_data=write_jsonl(tmp_path / "val.jsonl", varied_rows(2, seed=1)),
            output_dir=str(run),
            epochs=1,
            batch_size=4,
            gradient_accumulation_steps=2,
            max_length=128,
            precision="fp32",
            device="cpu",
            report_to=["tensorboard"],
        )
    )
    scalars = _scalars(run / "tensorboard")
    assert [step for step, _ in scalars["train/loss"]] == list(range(1, summary["steps"] + 1))
    assert scalars["eval/val_loss"][-1] == (summary["steps"], round(summary["last_val_loss"], 6))
    assert "summary/best_val_loss" in scalars
