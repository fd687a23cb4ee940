"""The UI and the run report for objectives beyond SFT and for sweeps: the charts of a DPO and a GRPO run's metrics
(API, report), a sweep's trials listed, opened, compared and resumed under SWEEP/TRIAL, and links out of the runs
folder still refused. One tiny GRPO run per module; the DPO run is the session's."""

import http.client
import json
import shutil
from pathlib import Path

import pytest
import test_ui_api
import test_ui_browser
from conftest import write_jsonl
from test_ui_api import age, kill_children, read_events
from test_ui_browser import CHROMIUM, legend_colors, shot, start_ui, stop_everything

from loratune.cli import main

pytest.importorskip("starlette", reason="the ui extra: pip install 'loratune[ui]'")

server_for, browser = test_ui_api.server_for, test_ui_browser.browser  # their fixtures, here too
PAIR_CHARTS = ["reward_accuracy", "pair_rewards", "pair_logps"]
GRPO_CHARTS = ["reward", "reward_functions", "reward_std", "kl", "completion_length", "shares"]


@pytest.fixture(scope="module")
def tiny_grpo_run(tiny_model, tmp_path_factory) -> Path:
    """A finished 2-step GRPO run with two rewards, validated at each step (read-only: copy it to change it)."""
    from loratune import TrainConfig, train

    root = tmp_path_factory.mktemp("tiny_grpo_run")
    rows = [{"input": f"{i}: send {i} blue mugs to leeds", "output": f"{i} mugs"} for i in range(4)]
    train(
        TrainConfig(
            model=tiny_model,
            objective="grpo",
            reward=("regex:mugs", "length:6=0.5"),
            train_data=write_jsonl(root / "train.jsonl", rows),
            val_data=write_jsonl(root / "val.jsonl", rows[:2]),
            output_dir=str(root / "run"),
            epochs=1,
            batch_size=2,
            gradient_accumulation_steps=1,
            num_generations=2,
            max_new_tokens=6,
            eval_every_steps=1,
            precision="fp32",
            device="cpu",
            max_length=64,
        )
    )
    return root / "run"


def _ids(charts: list[dict]) -> list[str]:
    return [c["id"] for c in charts]


def _series(charts: list[dict], chart_id: str) -> dict[str, bool]:
    """The chart's metrics, each with whether validation measures it."""
    return {s["key"]: s["validation"] for c in charts if c["id"] == chart_id for s in c["series"]}


def test_run_pages_chart_the_metrics_each_objective_logs(tiny_run, tiny_dpo_run, tiny_grpo_run, tmp_path, server_for):
    runs = tmp_path / "runs"
    for name, run in (("sft", tiny_run), ("dpo", tiny_dpo_run), ("dpo-2", tiny_dpo_run), ("grpo", tiny_grpo_run)):
        shutil.copytree(run, runs / name)
    ui = server_for(runs)

    assert ui.get("/api/runs/sft")[1]["charts"] == []  # SFT's page is as it was
    dpo = ui.get("/api/runs/dpo")[1]["charts"]
    assert _ids(dpo) == PAIR_CHARTS
    assert _series(dpo, "pair_rewards") == {"chosen_reward": True, "rejected_reward": True, "reward_margin": True}
    grpo = ui.get("/api/runs/grpo")[1]["charts"]
    assert _ids(grpo) == GRPO_CHARTS
    # each reward function by its name; validation (greedy answers) measures rewards, not KL or sampled lengths
    assert _series(grpo, "reward_functions") == {"reward_regex": True, "reward_length": True}
    assert _series(grpo, "reward") == {"reward": True} and _series(grpo, "kl") == {"kl": False}
    evals = [json.loads(line) for line in (runs / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert all("val_reward_regex" in r for r in evals if r["event"] == "eval")  # what the page draws exists

    conn = http.client.HTTPConnection("127.0.0.1", ui.port, timeout=10)  # the live page learns them the same way
    conn.request("GET", "/api/runs/grpo/events")
    event, _ = read_events(conn.getresponse(), lambda e: e["type"] == "metrics", timeout=10)
    assert event["charts"] == grpo
    conn.close()

    status, data = ui.get("/api/compare?runs=dpo,dpo-2,sft")
    assert status == 200 and _ids(data["runs"]["dpo-2"]["charts"]) == PAIR_CHARTS
    assert data["runs"]["sft"]["charts"] == []  # the page offers only what every chosen run logs: the loss


def test_the_report_charts_the_objectives_metrics(tiny_run, tiny_grpo_run, tmp_path):
    for name, source in (("sft", tiny_run), ("grpo", tiny_grpo_run)):
        shutil.copytree(source, tmp_path / name)
        assert main(["report", str(tmp_path / name)]) == 0
    assert not (tmp_path / "sft" / "metrics.png").exists()
    assert "Objective metrics" not in (tmp_path / "sft" / "report.md").read_text()

    assert (tmp_path / "grpo" / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (tmp_path / "grpo" / "report.md").read_text()
    assert "![the objective's metrics](metrics.png)" in text
    records = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["event"] == "train"]
    summary = json.loads((tmp_path / "grpo" / "summary.json").read_text())
    best = next(r for r in records if r["event"] == "eval" and r["step"] == summary["best_step"])
    values = [train[0]["reward_regex"], train[-1]["reward_regex"], best["val_reward_regex"]]
    assert f"| reward regex | {' | '.join(f'{v:.4g}' for v in values)} |" in text
    assert f"| kl | {train[0]['kl']:.4g} | {train[-1]['kl']:.4g} | — |" in text  # no validation of KL


def _sweep(runs: Path, tiny_run: Path, name: str, trials: int) -> Path:
    """A sweep folder as `loratune sweep` leaves it: trials, logs and the study."""
    folder = runs / name
    for i in range(trials):
        shutil.copytree(tiny_run, folder / f"trial-{i:03d}")
    (folder / "logs").mkdir()
    (folder / "logs" / "trial-000.log").write_text("training\n")
    (folder / "study.db").write_bytes(b"")
    return folder


def test_a_sweeps_trials_are_listed_opened_compared_and_resumed(tiny_run, tmp_path, server_for):
    runs, elsewhere = tmp_path / "runs", tmp_path / "elsewhere"
    shutil.copytree(tiny_run, runs / "single")
    sweep = _sweep(runs, tiny_run, "sweep-lr", 2)
    config = (sweep / "trial-001" / "config.yaml").read_text()
    (sweep / "trial-001" / "config.yaml").write_text(config.replace("learning_rate: 0.001", "learning_rate: 0.0002"))
    # links out of the runs folder: a sweep folder, and a trial in a real sweep folder
    _sweep(elsewhere, tiny_run, "sweep-out", 1)
    (runs / "sweep-out").symlink_to(elsewhere / "sweep-out")
    (sweep / "trial-009").symlink_to(elsewhere / "sweep-out" / "trial-000")
    ui = server_for(runs)

    rows = {r["name"]: r for r in ui.get("/api/runs")[1]["runs"]}
    assert sorted(rows) == ["single", "sweep-lr/trial-000", "sweep-lr/trial-001"]
    assert rows["sweep-lr/trial-001"]["group"] == "sweep-lr" and rows["single"]["group"] is None
    status, details = ui.get("/api/runs/sweep-lr%2Ftrial-001")
    assert status == 200 and details["row"]["state"] == "done" and details["summary"]["steps"] == 6
    for refused in ("sweep-out%2Ftrial-000", "sweep-lr%2Ftrial-009", "sweep-lr%2Flogs", "sweep-lr",
                    "sweep-lr%2F..%2Fsingle", "sweep-lr%2Ftrial-000%2Fcheckpoints"):  # fmt: skip
        assert ui.get(f"/api/runs/{refused}")[0] == 404, refused
    assert ui.get("/api/compare?runs=sweep-lr/trial-000,sweep-out/trial-000")[0] == 404

    status, data = ui.get("/api/compare?runs=sweep-lr%2Ftrial-000,sweep-lr%2Ftrial-001,single")
    assert status == 200 and set(data["runs"]) == {"sweep-lr/trial-000", "sweep-lr/trial-001", "single"}
    learning_rate = next(d for d in data["differences"] if d["name"] == "learning_rate")
    assert learning_rate["values"]["sweep-lr/trial-001"] == 0.0002

    # a trial cut short (pruned) says so, and resumes from the UI, its job kept under its SWEEP/TRIAL name
    (sweep / "trial-000" / "summary.json").unlink()
    age(sweep / "trial-000" / "metrics.jsonl", 3600)
    row = ui.get("/api/runs/sweep-lr%2Ftrial-000")[1]["row"]
    assert row["state"] == "stopped" and row["why"].startswith("stopped by its sweep (pruned"), row
    try:
        status, data = ui.post("/api/runs/sweep-lr%2Ftrial-000/resume")
        assert status == 200 and str(sweep / "trial-000") in data["command"], data
        row = ui.get("/api/runs/sweep-lr%2Ftrial-000")[1]["row"]
        assert row["state"] == "running" and not row["outside"]
        assert ui.post("/api/runs/sweep-lr%2Ftrial-000/resume")[0] == 409  # one start at a time
        assert sorted(r["name"] for r in ui.get("/api/runs")[1]["runs"]) == sorted(rows)
    finally:
        kill_children(runs)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)")
def test_browser_opens_a_sweep_charts_its_dpo_trials_and_compares_their_margin(
    tiny_run, tiny_dpo_run, tmp_path, browser
):
    runs = tmp_path / "runs"
    shutil.copytree(tiny_run, runs / "sft")
    for trial in ("trial-000", "trial-001"):
        shutil.copytree(tiny_dpo_run, runs / "sweep-pref" / trial)
    ui, url = start_ui(runs)
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "#/runs")  # the one page load: the rest moves within the page
        page.locator("tr.group[data-group=sweep-pref]").wait_for()
        assert page.locator("tr.trial").count() == 0  # closed until asked
        page.click("tr.group .group-toggle")
        page.click("tr.trial[data-run='sweep-pref/trial-001'] a")

        page.locator(".chart[data-metric=pair_rewards] canvas").wait_for()
        assert page.locator(".chart[data-metric]").count() == 3
        colors = legend_colors(page, ".chart[data-metric=pair_rewards]")
        assert set(colors) >= {"chosen (training)", "chosen (validation)", "margin (validation)"}
        assert colors["chosen (training)"] != colors["chosen (validation)"]
        accuracy = ".chart[data-metric=reward_accuracy]"
        over = page.locator(f"{accuracy} .u-over")
        box = over.bounding_box()
        over.hover(position={"x": box["width"] - 2, "y": box["height"] / 2})  # the last step: its values in the legend
        drawn = page.locator(f"{accuracy} .u-legend .u-value").all_inner_texts()
        assert drawn[0] == "6" and drawn[1].endswith("%") and drawn[2].endswith("%"), drawn
        assert page.locator("td", has_text=" in 48 pairs").count() == 1  # the summary counts its tokens in pairs
        shot(page, "run-dpo")

        page.click("nav a[data-page=runs]")
        page.locator("tr.group[data-group=sweep-pref] input[type=checkbox]").check()  # all its trials
        page.click("text=Compare selected")
        page.select_option("#compare-metric", "reward_margin")
        page.locator("#compare-chart[data-metric=reward_margin] canvas").wait_for()
        assert page.locator("#compare-chart").get_attribute("data-series") == "4"
        shot(page, "compare-metric")

        page.click(".picker label:has-text('sft') input")  # an SFT run with them: the loss alone compares
        page.locator("#compare-chart[data-metric=loss] canvas").wait_for()
        assert page.locator("#compare-metric option").all_inner_texts() == ["Loss"]
        page.goto(url + "#/run/sft")
        page.locator(".chart[data-points] canvas").first.wait_for()
        assert page.locator(".chart[data-metric]").count() == 0
        assert page.locator("td", has_text=" answer tokens)").count() == 1
        assert not errors, errors
    finally:
        stop_everything(ui, runs)
