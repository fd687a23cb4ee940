"""`python -m bench.gpu --device cpu`: the GPU benchmark's harness, run at tiny sizes, writes real numbers."""

import importlib.util
import json
import math

from bench.gpu import main


def _real(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_gpu_benchmark_runs_on_cpu_and_writes_real_numbers(tmp_path):
    out = tmp_path / "out"
    main(["--device", "cpu", "--shapes", "qwen2.5-0.5b", "--out", str(out), "--work", str(tmp_path / "work")])
    report = json.loads((out / "gpu.json").read_text())
    assert report["failures"] == {}
    assert _real(report["peak_flops"]["bf16"]) and _real(report["peak_flops"]["fp32"])

    # speed: every installed trainer ran the same tokens, learning rates and step-1 loss
    speed = report["speed"]["qwen2.5-0.5b"]
    trainers = {"hf", "loratune"} | ({"trl"} if importlib.util.find_spec("trl") else set())
    assert speed["failed"] == {} and set(speed["trainers"]) == trainers
    assert speed["checks"] == speed["checks"] | {"same_tokens": True, "same_lrs": True, "same_first_loss": True}
    for row in speed["trainers"].values():
        assert all(_real(row[k]) for k in ("tokens_per_s", "peak_mib", "first_loss", "final_loss", "speedup"))
        assert _real(row["mfu"]["bf16"]) and 0 <= row["padding"] < 1
    assert speed["trainers"]["loratune"]["attention"] == "packed" and _real(speed["trainers"]["loratune"]["plan_mib"])

    # memory: packed and padded, with and without checkpointing, each measured and estimated
    cases = report["memory"]["cases"]
    assert len(cases) == 4 and "stopped" not in report["memory"]
    for case in cases:
        assert case["status"] == "ok", case
        assert _real(case["measured"]) and _real(case["estimated"]) and 0.5 < case["ratio"] < 2

    # the CUDA-only paths are skipped with their reason; the out-of-memory replay runs (simulated on a CPU)
    checks = report["checks"]
    assert checks["oom_replay"]["status"] == "ok", checks["oom_replay"]
    assert checks["oom_replay"]["halvings"] >= 1 and checks["oom_replay"]["adapter_difference"] < 1e-3
    for name in ("flash_varlen", "fused_adamw", "batch_auto", "liger_kernels", "qlora", "torch_compile"):
        assert checks[name]["status"] == "skipped" and checks[name]["detail"].startswith("CUDA only"), name

    table = (out / "gpu.md").read_text()
    assert "tiny sizes: a check of the harness, not a measurement" in table
    loratune_row = next(line for line in table.splitlines() if line.startswith("| (c) loratune |"))
    assert f"{speed['trainers']['loratune']['tokens_per_s']:,.0f}" in loratune_row
    assert "| oom_replay | ok |" in table and "## Issue 24 targets (one H100)" in table
