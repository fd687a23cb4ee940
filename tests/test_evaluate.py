import json
import math

import pytest

from loratune.cli import main
from loratune.inference.evaluate import evaluate_run


def test_eval_reproduces_the_validation_loss_and_scores_generations(tiny_run, tmp_path):
    trained = json.loads((tiny_run / "summary.json").read_text())
    val = tiny_run.parent / "val.jsonl"
    report = tmp_path / "report.jsonl"
    assert (
        main(
            ["eval", str(tiny_run), "--data", str(val), "--generate", "--max-new-tokens", "8", "--report", str(report)]
        )
        == 0
    )
    summary, *rows = map(json.loads, report.read_text().splitlines())
    # the best adapter's loss on the validation file is the loss training measured for it
    assert summary["fine_tuned"]["loss"] == pytest.approx(trained["best_val_loss"], rel=1e-5)
    assert abs(summary["base"]["loss"] - summary["fine_tuned"]["loss"]) > 0.01
    assert summary["base"]["perplexity"] == pytest.approx(math.exp(summary["base"]["loss"]))
    assert len(rows) == summary["examples"] == 4
    for model in ("base", "fine_tuned"):
        for metric in ("exact_match", "overlap_f1"):
            assert summary[model][metric] == pytest.approx(sum(r[metric][model] for r in rows) / len(rows))
    assert all(r["prompt"] and r["reference"] and isinstance(r["fine_tuned"], str) for r in rows)

    # RUN_DIR may be an adapter folder inside the run: last/ holds the final step's adapter
    last = evaluate_run(tiny_run / "last", str(val), report=tmp_path / "last.jsonl")
    assert last["fine_tuned"]["loss"] == pytest.approx(trained["last_val_loss"], rel=1e-5)
