"""`python -m bench --objective dpo --quick`: the DPO workload's harness on the tiny model (a check, not a
measurement). TRL's DPOTrainer and loratune train the same pairs from the same adapter to the same losses, and a
repeated loratune run reads every reference log-probability from the cache its first run filled."""

import json
import math

import pytest

from bench.__main__ import main

pytest.importorskip("trl")


def test_dpo_benchmark_trains_the_same_pairs_to_the_same_losses(tmp_path):
    out = tmp_path / "dpo"
    main(["--objective", "dpo", "--models", "tiny", "--quick", "--out", str(out), "--work", str(tmp_path / "work")])
    report = json.loads(out.with_suffix(".json").read_text())
    tiny = report["models"]["tiny"]
    assert report["precision"] == "fp32" and set(tiny["trainers"]) == {
        "trl_dpo", "trl_dpo_pre", "loratune", "loratune_cached"
    }  # fmt: skip
    assert tiny["checks"] == tiny["checks"] | {
        "same_tokens": True, "same_lrs": True, "same_steps": True, "fresh_computed_all": True,
        "cached_computed_none": True,
    }  # fmt: skip
    assert tiny["checks"]["first_loss_is_log2"] < 1e-6  # the adapter starts at zero: the policy is its reference
    assert tiny["checks"]["step_loss_spread"] < 1e-4
    losses = [run["losses"] for runs in tiny["runs"].values() for run in runs]
    assert all(len(x) == 2 and abs(x[1] - math.log(2)) > 1e-3 for x in losses)  # step 2 follows an update
    for row in tiny["trainers"].values():
        assert row["tokens_per_s"] > 0 and row["peak_mib"] > 0 and 0 <= row["padding"] < 1
    assert tiny["trainers"]["loratune"]["padding"] == 0  # packed rows
    assert tiny["trainers"]["trl_dpo_pre"]["reference_seconds"] > 0
    table = out.with_suffix(".md").read_text()
    assert "| (b) TRL DPOTrainer + PEFT |" in table and "The cached reference: loratune's run took" in table
