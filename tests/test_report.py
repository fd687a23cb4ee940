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


def test_the_plot_process_draws_the_run_s_own_plots(tiny_run, tmp_path):
    """The helper `loratune train` starts draws the very loss.png the run would draw itself; when it has died the
    run draws it; one that was never asked ends without writing anything."""
    from loratune.training.plot_process import PlotProcess
    from loratune.training.report import best_evaluation, read_records, write_report

    runs = {}
    for helper in ("alive", "dead", "none"):  # same folder name: the plot's title is the run's name
        runs[helper] = tmp_path / helper / "run"
        shutil.copytree(tiny_run, runs[helper])
        for plot in runs[helper].glob("*.png"):
            plot.unlink()
    summary = json.loads((tiny_run / "summary.json").read_text())
    for helper in ("alive", "dead"):
        plots = PlotProcess()
        if helper == "dead":
            plots.child.kill()
            plots.child.wait()
        train, evals = read_records(runs[helper])
        plots.draw(runs[helper], train, evals, best_evaluation({"best_step": summary["best_step"]}, evals))
        drawn = plots.drawn()
        plots.close()
        assert drawn == (runs[helper] / "loss.png").is_file() == (helper == "alive")
        write_report(runs[helper], drawn=lambda answer=drawn: answer)
    write_report(runs["none"])
    images = {helper: (run / "loss.png").read_bytes() for helper, run in runs.items()}
    assert images["alive"] == images["dead"] == images["none"]

    idle = PlotProcess()
    idle.close()
    assert idle.child.returncode is not None and not idle.drawn()
