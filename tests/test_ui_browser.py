"""`loratune ui` in a real browser (Debian's chromium driven by Playwright): a user's whole path through it.

Set LORATUNE_UI_SCREENSHOTS=DIR to also save a 1280x800 screenshot of each page there (docs/ui/ holds them).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import varied_rows, write_jsonl

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)")
SHOTS = os.environ.get("LORATUNE_UI_SCREENSHOTS")


def start_ui(runs: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """`loratune ui` on a free loopback port, as a user starts it; returns the process and the URL it printed."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "loratune", "ui", "--runs", str(runs), "--port", "0", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    line = proc.stdout.readline()
    assert line.startswith("loratune ui: http://"), line + proc.stdout.read()
    return proc, line.split()[2]


def stop_everything(ui: subprocess.Popen, runs: Path) -> None:
    """The UI, then any training or Try process it left (the runs outlive the UI by design)."""
    ui.send_signal(signal.SIGINT)
    ui.wait(timeout=20)
    for record in (runs / ".loratune-ui" / "jobs").glob("*.json"):
        pid = json.loads(record.read_text())["pid"]
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield b
        b.close()


def shot(page, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.wait_for_timeout(300)  # the charts' last frame
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"))


def points(page) -> int:
    return int(page.locator(".chart[data-points]").first.get_attribute("data-points") or 0)


def wait_points(page, more_than: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = points(page)
        if n > more_than:
            return n
        page.wait_for_timeout(200)
    raise AssertionError(f"the loss chart did not grow past {more_than} points in {timeout}s")


def fill_new_run(page, tiny_model: str, data: Path) -> None:
    page.fill("#run-name", "first")
    page.fill("#f-model", tiny_model)
    for field in ("train", "val"):  # no test set: its generations before and after would only add time
        page.fill(f"#f-{field}_data", str(data / f"{field}.jsonl"))
    page.fill("#f-batch_size", "4")
    page.fill("#f-gradient_accumulation_steps", "1")
    # The Guide's range warning shows inline as the user types.
    warning = page.locator("[data-field=gradient_accumulation_steps] .warn")
    warning.wait_for()
    assert "recommended range 4-32" in warning.inner_text()
    page.fill("#f-epochs", "100")
    page.click("text=All other settings")
    page.fill("#f-early_stopping_patience", "0")
    page.fill("#f-eval_every_steps", "4")


def test_new_run_live_chart_stop_resume_compare_and_try(tiny_model, tiny_run, tmp_path, browser):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", varied_rows(24))
    write_jsonl(data / "val.jsonl", varied_rows(4, seed=1))
    write_jsonl(data / "broken.jsonl", varied_rows(4))  # broken after its plan, as a file changed meanwhile
    runs = tmp_path / "runs"
    shutil.copytree(tiny_run, runs / "second")  # a finished run to compare with, export and try
    ui, url = start_ui(runs)
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        errors, elsewhere = [], []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: None if r.url.startswith(url) else elsewhere.append(r.url))  # no CDN

        # New run: the form, then what plan and data inspect say, with the recommended max_length used in one click.
        page.goto(url + "#/new")
        fill_new_run(page, tiny_model, data)
        page.click("#check-plan")
        page.locator("#use-it").wait_for(timeout=90_000)
        assert page.locator(".verdict").inner_text().startswith("Fits")
        assert ", likely " in page.inner_text("body")  # no run measured yet: the rough time's range
        recommended = page.locator(".recommend").inner_text().split("max_length: ")[1].split(" ")[0]
        page.click("#use-it")
        assert page.input_value("#f-max_length") == recommended
        page.locator("#start:not([disabled])").wait_for(timeout=90_000)
        page.evaluate("window.scrollTo(0, 0)")
        shot(page, "new-run")

        # Start: `loratune train` as a child process; the loss chart gains points while it trains.
        page.click("#start")
        page.wait_for_url("**#/run/first")
        page.locator(".toolbar .badge.state-running").wait_for(timeout=30_000)
        seen = wait_points(page, 1, timeout=120)
        seen = wait_points(page, seen)
        shot(page, "run")

        # Stop = Ctrl-C: a checkpoint, then exit; Resume continues it from there.
        page.click("#stop")
        page.locator(".notice.info", has_text="Stopping: the run saves a checkpoint").wait_for()
        page.locator(".toolbar .badge.state-stopped").wait_for(timeout=60_000)
        assert "SIGINT: checkpoint saved" in page.locator(".toolbar .why").inner_text()
        assert page.locator("ul.checkpoints li").count() >= 1
        at_stop = points(page)
        page.click("#resume")
        page.locator(".toolbar .badge.state-running").wait_for(timeout=30_000)
        wait_points(page, at_stop, timeout=120)

        # A second run while the first trains: allowed, with a warning; its data is broken, so it fails and says why.
        page.goto(url + "#/new")
        page.fill("#run-name", "broken")
        page.fill("#f-model", tiny_model)
        page.fill("#f-train_data", str(data / "broken.jsonl"))
        page.click("#check-plan")
        page.locator("#start:not([disabled])").wait_for(timeout=90_000)
        (data / "broken.jsonl").write_text('{"input": "a", "output": "b"}\n{"input": "cut\n')
        page.click("#start")
        page.wait_for_url("**#/run/broken")
        assert "first is training too" in page.locator(".notice.warning").first.inner_text()
        page.locator(".toolbar .badge.state-failed").wait_for(timeout=90_000)
        assert page.locator(".notice.failure").inner_text().startswith("error: ")
        assert "broken.jsonl line 2" in page.locator(".notice.failure").inner_text()

        # Runs: the list follows the training run live, without reloading.
        page.goto(url + "#/runs")
        steps = "tr[data-run=first] td.num"
        page.locator(steps).first.wait_for()
        shown = page.locator(steps).first.inner_text()
        page.wait_for_function(
            "([sel, text]) => document.querySelector(sel).textContent !== text", arg=[steps, shown], timeout=60_000
        )
        page.goto(url + "#/run/first")
        page.click("#stop")
        page.locator(".toolbar .badge.state-stopped").wait_for(timeout=60_000)
        page.goto(url + "#/runs")
        page.locator("tr[data-run=first] .badge.state-stopped").wait_for()
        page.locator("tr[data-run=second] .badge.state-done").wait_for()
        shot(page, "runs")

        # Compare: both runs' curves overlaid, and the settings that differ.
        page.goto(url + "#/compare?runs=first,second")
        page.locator("#compare-chart canvas").wait_for()
        assert page.locator("#compare-chart").get_attribute("data-series") == "4"
        assert "learning_rate" in page.locator("#differences").inner_text()
        shot(page, "compare")

        # Export: a finished run's GGUF file, written by `loratune export` as a child process.
        page.goto(url + "#/run/second")
        page.select_option("#gguf-type", "q8_0")
        page.click("#export")
        page.locator(".notice.info", has_text="done: wrote").wait_for(timeout=90_000)
        assert page.input_value("#gguf-type") == "q8_0"  # kept while the page redraws
        assert (runs / "second" / "second-q8_0.gguf").is_file()

        # Try it: the fine-tuned and the base model answer side by side.
        page.goto(url + "#/try?run=second")
        page.locator("#try-adapter option").first.wait_for(state="attached")
        page.fill("#try-max", "16")
        page.fill("#try-message", "order two blue mugs")
        page.click("#ask")
        for side in ("tuned", "base"):
            page.locator(f"#answer-{side} .turn.model:not(.streaming)").wait_for(timeout=90_000)
        assert page.locator("#answer-tuned .turn.model").inner_text().strip()
        assert page.locator("#answer-base .turn.model").inner_text().strip()
        shot(page, "try")
        assert not errors, errors
        assert not elsewhere, elsewhere
    finally:
        stop_everything(ui, runs)


def legend_colors(page, chart: str) -> dict[str, str]:
    return page.evaluate(
        """(chart) => Object.fromEntries([...document.querySelectorAll(`${chart} .u-legend .u-series`)]
             .filter((row) => row.querySelector(".u-marker"))
             .map((row) => [row.querySelector(".u-label").textContent,
                            getComputedStyle(row.querySelector(".u-marker")).borderColor]))""",
        chart,
    )


def test_pages_keep_working_with_non_finite_metrics_bad_addresses_and_forms(tiny_model, tiny_run, tmp_path, browser):
    runs = tmp_path / "runs"
    shutil.copytree(tiny_run, runs / "live")  # training (its metrics are fresh, it has no summary yet)
    (runs / "live" / "summary.json").unlink()
    (runs / "live" / "metrics.jsonl").touch()
    shutil.copytree(tiny_run, runs / "second")
    checkpoints = runs / "second" / "checkpoints"
    shutil.copytree(checkpoints / "step-000004", checkpoints / "step-000004.1")  # as Stop saves one mid-step
    jobs = runs / ".loratune-ui" / "jobs"  # a run that failed before it made its folder
    jobs.mkdir(parents=True)
    record = {"name": "bad", "kind": "train", "pid": 2**22 + 1, "argv": ["train"], "started": 1.0, "returncode": 2}
    (jobs / "bad.train.json").write_text(json.dumps(record))
    (jobs / "bad.train.log").write_text("=== start\nerror: train_data = 'x.jsonl': file not found\n")
    evals = [r for r in map(json.loads, (tiny_run / "metrics.jsonl").read_text().splitlines()) if r["event"] == "eval"]
    ui, url = start_ui(runs)
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))

        # A skipped non-finite step and a NaN validation loss arrive while the run page is open: it draws around them.
        page.goto(url + "#/run/live")
        before = wait_points(page, 0)
        with open(runs / "live" / "metrics.jsonl", "a") as f:  # Python's json, as the trainer writes them
            for record in ({"event": "train", "step": 7, "loss": float("nan"), "grad_norm": float("inf")},
                           {"event": "eval", "step": 7, "val_loss": float("nan")},
                           {"event": "train", "step": 8, "loss": 1.5, "grad_norm": 0.5}):  # fmt: skip
                f.write(json.dumps(record) + "\n")
        assert wait_points(page, before + 1, timeout=10) == before + 2
        assert "after step 6" in page.locator("ul.checkpoints").inner_text()
        # What it does now shows as it changes; its held-out answers are said to come when training ends.
        validating = {"event": "phase", "phase": "validate", "text": "validating at step 8", "step": 8}
        with open(runs / "live" / "metrics.jsonl", "a") as f:
            f.write(json.dumps(validating | {"time": time.time()}) + "\n")
        page.locator(".toolbar #phase", has_text="validating at step 8").wait_for(timeout=10_000)
        assert "show here when training ends" in page.locator("section.card", has_text="Held-out").inner_text()

        page.goto(url + "#/runs")
        best = page.locator("tr[data-run=live] td.num").nth(1)
        best.wait_for()
        assert best.inner_text() == f"{min(r['val_loss'] for r in evals):.4f}"

        # Compare: each run's training and validation curves in two colours.
        page.goto(url + "#/compare?runs=live,second")
        page.locator("#compare-chart canvas").wait_for()
        colors = legend_colors(page, "#compare-chart")
        assert (
            len({colors[f"{run} {curve}"] for run in ("live", "second") for curve in ("training", "validation")}) == 4
        )

        # Checkpoints in words, also where Try it offers them.
        page.goto(url + "#/run/second")
        assert "part-way through step 5" in page.locator("ul.checkpoints").inner_text()

        # A run that failed before it made its folder shows its failure, not a missing folder or config.
        page.goto(url + "#/run/bad")
        page.locator(".notice.failure", has_text="file not found").wait_for()
        assert page.locator("text=The run folder is gone").count() == 0
        assert page.locator("text=config.yaml is missing").count() == 0

        # A malformed % in the address: the page says so and works on.
        page.goto(url + "#/run/50%")
        page.locator(".notice.error", has_text="no run named '50%'").wait_for()
        page.click("nav a[data-page=runs]")
        page.locator("tr[data-run=second]").wait_for()

        # New run: the Guide's warnings stay while another field is wrong; Start waits for training data.
        page.goto(url + "#/new")
        page.fill("#f-model", tiny_model)
        page.fill("#f-gradient_accumulation_steps", "1")
        page.fill("#f-batch_size", "-2")
        page.locator("[data-field=batch_size] .err").wait_for()
        assert "from --" not in page.locator("[data-field=batch_size] .err").inner_text()
        assert page.locator("[data-field=gradient_accumulation_steps] .warn").count() == 1
        page.fill("#f-batch_size", "4")
        page.click("#check-plan")
        page.locator("#start-error", has_text="give training data").wait_for(timeout=90_000)
        assert page.locator("#start").is_disabled()
        assert not errors, errors
    finally:
        stop_everything(ui, runs)
