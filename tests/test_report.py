import json
import shutil

from loratune.cli import main


def test_report_of_a_finished_and_of_an_unfinished_run(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert main(["report", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (run / "report.md").read_text()
    assert "![training and validation loss](loss.png)" in text
    assert f"| best step | {summary['best_step']} " in text
    first_test = json.loads((tiny_run.parent / "test.jsonl").read_text().splitlines()[0])
    assert first_test["input"] in text and summary["test_after"]["samples"][0][:40] in text
    assert "tokens per second" in text and "model: " in text  # throughput, and the config

    (run / "summary.json").unlink()  # a run stopped before the end still gets its plot and report
    assert main(["report", str(run)]) == 0
    assert "not finished" in (run / "report.md").read_text()
