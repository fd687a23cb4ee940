import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import varied_rows, write_jsonl
from safetensors.torch import load_file


@pytest.mark.parametrize("packing", ["--packing", "--no-packing"])
def test_two_processes_equal_one_process_with_double_accumulation(tiny_model, tmp_path, packing):
    """DDP over 2 CPU processes (gloo) takes the same examples per step as 1 process accumulating twice as long."""
    train = write_jsonl(tmp_path / "train.jsonl", varied_rows(32))
    val = write_jsonl(tmp_path / "val.jsonl", varied_rows(4, seed=1))
    common = [
        "--model",
        tiny_model,
        "--train-data",
        train,
        "--val-data",
        val,
        "--epochs",
        "2",
        "--precision",
        "fp32",
        "--device",
        "cpu",
        "--lora-dropout",
        "0",
        "--max-grad-norm",
        "0",
        "--learning-rate",
        "1e-3",
        "--batch-size",
        "2",
        packing,
    ]

    def run(name, *extra):
        result = subprocess.run(
            [sys.executable, "-m", "loratune", "train", *common, "--output-dir", str(tmp_path / name), *extra],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout

    run("one", "--gradient-accumulation-steps", "4")
    out = run("two", "--gradient-accumulation-steps", "2", "--num-processes", "2")
    assert "effective batch 8 = batch_size 2 x gradient_accumulation_steps 2 x 2 processes" in out
    assert sum(line.startswith("step 8: validation loss") for line in out.splitlines()) == 1  # main process only
    steps = [
        [
            r
            for r in map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines())
            if r["event"] == "train"
        ]
        for name in ("one", "two")
    ]
    assert len(steps[0]) == 8
    for a, b in zip(*steps):
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-4)
        assert a["tokens"] == b["tokens"] and a["padding_share"] == b["padding_share"]  # both counted over all passes
    assert (steps[0][0]["padding_share"] > 0) == (packing == "--no-packing")
    one = load_file(tmp_path / "one/last/adapter_model.safetensors")
    two = load_file(tmp_path / "two/last/adapter_model.safetensors")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(one[key], two[key], atol=1e-5, rtol=1e-4)
