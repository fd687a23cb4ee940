"""`loratune ui`'s API over real HTTP (uvicorn on a loopback port): run states, damaged and deleted run folders, live
metrics, path traversal, the token, the new-run checks, and child processes that outlive the UI."""

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
from conftest import varied_rows, write_jsonl

pytest.importorskip("starlette", reason="the ui extra: pip install 'loratune[ui]'")


class Server:
    """The app on a free loopback port, in a thread."""

    def __init__(self, runs: Path, token: str | None = None, loopback_only: bool = True):
        import uvicorn

        from loratune.ui.main import bind
        from loratune.ui.server import create_app

        sock = bind("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        hosts = {f"127.0.0.1:{self.port}"} if loopback_only else None
        self.app = create_app(runs, token=token, hosts=hosts)
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)

    def request(self, method: str, path: str, body=None, headers=None, raw: bytes | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        sent = {"X-Loratune": "1"} | (headers or {})
        payload = raw if raw is not None else None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=payload, headers=sent)
        response = conn.getresponse()
        data = response.read()
        conn.close()
        try:
            return response.status, json.loads(data), response
        except ValueError:
            return response.status, data.decode(), response

    def get(self, path: str):
        status, data, _ = self.request("GET", path)
        return status, data

    def post(self, path: str, body=None):
        status, data, _ = self.request("POST", path, body=body)
        return status, data

    def wait_job(self, name: str, kind: str, timeout: float = 120) -> dict:
        """A merge or export of run `name`, once it has ended."""
        deadline = time.monotonic() + timeout
        job = self.get(f"/api/runs/{name}")[1][kind]
        while job["state"] == "running" and time.monotonic() < deadline:
            time.sleep(0.5)
            job = self.get(f"/api/runs/{name}")[1][kind]
        return job

    def wait_row(self, name: str, check, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, data = self.get(f"/api/runs/{name}")
            if status == 200 and check(data["row"]):
                return data["row"]
            time.sleep(0.3)
        raise AssertionError(f"{name}: condition not met in {timeout}s; last: {data}")

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def server_for():
    started = []

    def start(runs: Path, **kwargs) -> Server:
        started.append(Server(runs, **kwargs))
        return started[-1]

    yield start
    for s in started:
        s.close()


def kill_children(runs: Path) -> None:
    for record in (runs / ".loratune-ui" / "jobs").glob("*.json"):
        try:
            os.kill(json.loads(record.read_text())["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_states_of_finished_failed_cut_damaged_and_deleted_runs(tiny_run, tmp_path, server_for):
    runs = tmp_path / "runs"
    shutil.copytree(tiny_run, runs / "done")
    shutil.copytree(tiny_run, runs / "cut")  # a crash: no summary, a line cut mid-way, a damaged line
    (runs / "cut" / "summary.json").unlink()
    lines = (runs / "cut" / "metrics.jsonl").read_text().splitlines(keepends=True)
    (runs / "cut" / "metrics.jsonl").write_text(
        "".join(lines[:3]) + "{not json\n" + "".join(lines[3:]) + '{"event": "tr'
    )
    age(runs / "cut" / "metrics.jsonl", 3600)
    (runs / "half").mkdir()  # stopped while its first files were written
    (runs / "half" / "config.yaml").write_text("model: [unclosed")
    (runs / "half" / "metrics.jsonl").write_text("")
    age(runs / "half" / "metrics.jsonl", 3600)
    jobs = runs / ".loratune-ui" / "jobs"  # a run this UI started, which failed before making its folder
    jobs.mkdir(parents=True)
    record = {"name": "bad", "kind": "train", "pid": 2**22 + 1, "argv": ["train"], "started": 1.0, "returncode": 2}
    (jobs / "bad.train.json").write_text(json.dumps(record))
    error = "error: train_data = 'x.jsonl' (from --train-data): file not found"
    (jobs / "bad.train.log").write_text(f"=== start\n{error}\n")
    (jobs / "gone.train.json").write_text(json.dumps(record | {"name": "gone", "returncode": 130}))
    (jobs / "gone.train.log").write_text("=== start\nstopped: SIGINT: checkpoint saved.\n")  # then deleted
    shutil.copytree(tiny_run, runs / "my run ü")  # a name the UI would not give, from a terminal: it works too
    (runs / "a,b").mkdir()  # Compare's separator: not listed
    (runs / "a,b" / "config.yaml").write_text("model: x\n")
    ui = server_for(runs)

    status, data = ui.get("/api/runs")
    assert status == 200
    rows = {r["name"]: r for r in data["runs"]}
    assert set(rows) == {"bad", "cut", "done", "half", "my run ü"}
    assert ui.get("/api/runs/" + urllib.parse.quote("my run ü"))[1]["row"]["state"] == "done"
    assert ui.get("/api/compare?runs=" + urllib.parse.quote("my run ü,done"))[0] == 200
    assert (rows["done"]["state"], rows["done"]["why"]) == ("done", "all epochs done")
    assert rows["done"]["best_val_loss"] == pytest.approx(
        json.loads((tiny_run / "summary.json").read_text())["best_val_loss"]
    )
    assert rows["done"]["step"] == rows["done"]["total_steps"] == 6 and rows["done"]["peak_memory"] > 0
    assert rows["cut"]["state"] == "stopped" and "step 6" in rows["cut"]["why"]
    assert rows["cut"]["bad_metrics_lines"] == 1 and rows["cut"]["step"] == 6
    assert rows["half"]["state"] == "failed"
    assert (rows["bad"]["state"], rows["bad"]["why"]) == ("failed", error)

    status, details = ui.get("/api/runs/done")
    assert status == 200 and [s["before"] is not None for s in details["samples"]] == [True, True]
    assert details["samples"][0]["prompt"] and details["data"] and details["checkpoints"]
    assert {c["name"]: c["source"] for c in details["config"]}["lora_r"] == "default"
    status, details = ui.get("/api/runs/half")
    assert status == 200 and details["config_error"]
    status, details = ui.get("/api/runs/bad")  # no folder: its failure says it all, no "config.yaml is missing"
    assert status == 200 and details["config_error"] is None and not details["row"]["exists"]

    shutil.rmtree(runs / "done")
    assert "done" not in {r["name"] for r in ui.get("/api/runs")[1]["runs"]}
    assert ui.get("/api/runs/done")[0] == 404


def read_events(response, until, timeout: float):
    """Server-sent events from an open response until `until(event)`; returns (event, seconds it took)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        line = response.fp.readline().decode()
        if line.startswith("data: "):
            event = json.loads(line[6:])
            if until(event):
                return event, time.monotonic() - start
    raise AssertionError("no such event")


def test_a_new_metrics_line_reaches_the_page_within_2_seconds_and_a_cut_line_waits(tiny_run, tmp_path, server_for):
    runs = tmp_path / "runs"
    shutil.copytree(tiny_run, runs / "live")
    ui = server_for(runs)
    conn = http.client.HTTPConnection("127.0.0.1", ui.port, timeout=10)
    conn.request("GET", "/api/runs/live/events")
    response = conn.getresponse()
    assert response.getheader("content-type").startswith("text/event-stream")
    read_events(response, lambda e: e["type"] == "metrics" and len(e["records"]) > 6, timeout=10)

    record = {"event": "train", "step": 7, "loss": 1.5, "tokens": 10, "time": time.time()}
    text = json.dumps(record) + "\n"
    with open(runs / "live" / "metrics.jsonl", "a") as f:
        f.write(text[:20])  # half a line: a writer caught mid-line
        f.flush()
        time.sleep(1.2)
        f.write(text[20:])
    event, seconds = read_events(response, lambda e: e["type"] == "metrics", timeout=5)
    assert event["records"] == [record] and not event["reset"]
    assert seconds < 2
    conn.close()


def test_nothing_outside_the_runs_folder_can_be_reached(tiny_run, tmp_path, server_for):
    runs = tmp_path / "runs"
    shutil.copytree(tiny_run, runs / "done")
    (tmp_path / "secret.jsonl").write_text('{"input": "classified", "output": "x"}\n')
    ui = server_for(runs)
    for path in ("/api/runs/..", "/api/runs/%2E%2E", "/api/runs/..%2Fsecret.jsonl", "/api/runs/.loratune-ui",
                 "/api/runs/uploads", "/static/../../secret.jsonl", "/static/%2E%2E/%2E%2E/secret.jsonl",
                 "/api/compare?runs=done,..", "/api/runs/%2Ftmp"):  # fmt: skip
        status, data = ui.get(path)
        assert status == 404, (path, data)
        assert "classified" not in json.dumps(data)  # a 404 may name the path asked for, never what it holds
    assert ui.post("/api/runs/../stop")[0] == 404
    assert ui.post("/api/try", {"run": "../runs/done", "message": "hi"})[0] == 404
    status, data = ui.post("/api/try", {"run": "done", "adapter": "../../secret", "message": "hi"})
    assert status == 400 and "adapter" in data["error"]
    status, data = ui.post("/api/runs", {"name": "../escaped", "values": {}})
    assert status == 400 and "run name" in data["error"]
    assert not (tmp_path / "escaped").exists()

    status, data, _ = ui.request("POST", "/api/upload?name=" + urllib.parse.quote("../../up.jsonl"), raw=b"{}\n")
    assert status == 200 and Path(data["path"]) == runs.resolve() / "uploads" / "up.jsonl"
    assert not (tmp_path / "up.jsonl").exists()
    status, data, _ = ui.request("POST", "/api/upload?name=run.sh", raw=b"echo\n")
    assert status == 400
    assert sorted(p.name for p in (runs / "uploads").iterdir()) == ["up.jsonl"]


def test_exposed_ui_prints_a_token_url_and_refuses_requests_without_it(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "loratune", "ui", "--runs", str(tmp_path / "runs"), "--host", "0.0.0.0", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = urllib.parse.urlsplit(proc.stdout.readline().split()[2])
        token = urllib.parse.parse_qs(url.query)["token"][0]
        assert len(token) >= 24
        for query, status in (("", 401), (f"?token={token}", 200)):
            conn = http.client.HTTPConnection("127.0.0.1", url.port, timeout=10)
            conn.request("GET", "/api/runs" + query)
            assert conn.getresponse().status == status
            conn.close()
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) in (0, 130)


def test_token_host_and_write_header(tmp_path, server_for):
    runs = tmp_path / "runs"
    exposed = server_for(runs, token="s3cret", loopback_only=False)
    assert exposed.get("/api/runs")[0] == 401
    assert exposed.get("/")[0] == 401
    assert exposed.get("/api/runs?token=wrong")[0] == 401
    status, _, response = exposed.request("GET", "/?token=s3cret")
    cookie = response.getheader("set-cookie")
    assert status == 200 and cookie.startswith("loratune_ui_token=s3cret") and "HttpOnly" in cookie
    assert exposed.request("GET", "/api/runs", headers={"Cookie": cookie.split(";")[0]})[0] == 200
    assert exposed.request("GET", "/api/runs", headers={"Authorization": "Bearer s3cret"})[0] == 200

    local = server_for(runs)
    assert local.get("/api/runs")[0] == 200
    assert local.request("GET", "/api/runs", headers={"Host": "attacker.example:80"})[0] == 403
    status, data, _ = local.request("POST", "/api/check", body={}, headers={"X-Loratune": ""})
    assert status == 403  # a form on another site cannot send the header
    status, _, response = local.request("GET", "/")
    assert "default-src 'self'" in response.getheader("content-security-policy")


def test_new_run_checks_say_what_the_guide_and_the_config_say(tiny_model, tmp_path, server_for):
    data = write_jsonl(tmp_path / "train.jsonl", varied_rows(8))
    ui = server_for(tmp_path / "runs")
    status, schema = ui.get("/api/form")
    assert [f["name"] for f in schema["fields"][:9]] == [
        "batch_size", "gradient_accumulation_steps", "max_length", "learning_rate", "epochs", "warmup_ratio",
        "lora_r", "lora_alpha", "lora_dropout",
    ]  # fmt: skip
    assert schema["fields"][3]["default"] == 2e-4 and "Guide range" in schema["fields"][3]["help"]
    values = {"model": tiny_model, "train_data": data}
    status, r = ui.post("/api/check", {"values": values | {"learning_rate": "1e-3", "lora_alpha": "8"}})
    assert r["error"] is None and set(r["warnings"]) == {"learning_rate", "lora_alpha"}
    status, r = ui.post("/api/check", {"values": values | {"batch_size": "-2", "learning_rate": "1e-3"}})
    assert r["field"] == "batch_size" and r["error"].startswith("batch_size = '-2': must be")  # no CLI flag in it
    assert set(r["warnings"]) == {"learning_rate"}  # the other fields' warnings stay while one field is wrong
    status, r = ui.post("/api/check", {"values": {"train_data": str(tmp_path / "none.jsonl")}})
    assert "file not found" in r["error"]
    status, r = ui.post("/api/plan", {"values": values, "name": "p"})
    assert status == 200 and r["plan"]["fits"] and r["inspect"]["recommended"] and r["start_error"] is None
    assert r["inspect"]["histogram"] and not (tmp_path / "runs" / "p").exists()
    status, r = ui.post("/api/plan", {"values": {"model": tiny_model}, "name": "p"})
    assert status == 200 and r["plan"] and r["start_error"] == "give training data (a path, or Upload…) to start"
    assert ui.post("/api/runs", {"values": {"model": tiny_model}, "name": "p"}) == (400, {"error": r["start_error"]})


def test_runs_outlive_the_ui_fail_with_their_error_line_merge_and_export(tiny_model, tiny_run, tmp_path, server_for):
    runs = tmp_path / "runs"
    shutil.copytree(tiny_run, runs / "done")
    train = write_jsonl(tmp_path / "train.jsonl", varied_rows(24))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "output": "b"}\n{"input": "cut\n')
    first = server_for(runs)
    try:
        values = {"model": tiny_model, "train_data": train, "epochs": "200", "batch_size": "4",
                  "gradient_accumulation_steps": "1", "early_stopping_patience": "0", "max_length": "192"}  # fmt: skip
        status, r = first.post("/api/runs", {"name": "long", "values": values})
        assert status == 200 and r["warning"] is None and r["command"].startswith("loratune train")
        status, r = first.post("/api/runs", {"name": "broken", "values": values | {"train_data": str(bad)}})
        assert status == 200 and "long" in r["warning"]  # two at once: allowed, with a warning
        status, r = first.post("/api/runs/done/merge")
        assert status == 200
        row = first.wait_row("broken", lambda row: row["state"] == "failed")
        assert row["why"].startswith("error: ") and "bad.jsonl" in row["why"]
        first.wait_row("long", lambda row: row["step"] >= 1)
        first.close()  # the UI stops; the run goes on

        second = server_for(runs)
        assert second.wait_row("long", lambda row: True)["state"] == "running"
        assert second.post("/api/runs/long/stop") == (200, {"stopping": "long"})
        row = second.wait_row("long", lambda row: row["state"] != "running", timeout=60)
        assert row["state"] == "stopped" and "SIGINT: checkpoint saved" in row["why"]
        assert second.wait_job("done", "merge")["state"] == "done"
        assert (runs / "merged" / "done" / "config.json").is_file()

        assert second.post("/api/runs/done/export", {"type": "q4_2"})[0] == 200  # the CLI checks the type
        failed = second.wait_job("done", "export")
        assert failed["state"] == "failed" and "q4_2" in failed["line"] and "q8_0" in failed["line"], failed
        assert second.post("/api/runs/done/export", {"type": "q8_0"})[0] == 200
        exported = second.wait_job("done", "export")
        assert exported["state"] == "done" and exported["line"].startswith(f"wrote {runs / 'done' / 'done-q8_0.gguf'}")
        assert (runs / "done" / "done-q8_0.gguf").is_file() and (runs / "done" / "done-q8_0.Modelfile").is_file()
    finally:
        kill_children(runs)


def ask(ui: Server, body: dict) -> list[dict]:
    """Try it's events for one request, to its end."""
    conn = http.client.HTTPConnection("127.0.0.1", ui.port, timeout=120)
    conn.request("POST", "/api/try", body=json.dumps(body), headers={"X-Loratune": "1"})
    response = conn.getresponse()
    events = []
    while not events or not events[-1].get("end"):
        line = response.fp.readline().decode()
        assert line, events
        if line.startswith("data: "):
            events.append(json.loads(line[6:]))
    conn.close()
    return events


def test_try_streams_the_fine_tuned_then_the_base_answer(tiny_run, tmp_path, server_for):
    runs = tmp_path / "runs"
    shutil.copytree(tiny_run, runs / "done")
    ui = server_for(runs)
    events = ask(ui, {"run": "done", "message": "order two mugs", "max_new_tokens": 12, "history": {}})
    assert events[0]["ready"] and not any("error" in e for e in events)
    done = [i for i, e in enumerate(events) if e.get("done")]
    assert [events[i]["side"] for i in done] == ["fine-tuned", "base"]
    pieces = [e for e in events[: done[0]] if e.get("side") == "fine-tuned" and "text" in e]
    assert len(pieces) > 1  # streamed piece by piece, not in one go
    assert "".join(p["text"] for p in pieces).strip() == events[done[0]]["text"]


def strict_json(text: str):
    """JSON as a browser parses it: NaN and Infinity are errors."""

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_a_nan_or_infinity_in_the_metrics_is_sent_as_null(tiny_run, tmp_path, server_for):
    runs = tmp_path / "runs"
    for name in ("nan", "other"):
        shutil.copytree(tiny_run, runs / name)
    (runs / "nan" / "summary.json").unlink()  # the best validation loss comes from the metrics then
    with open(runs / "nan" / "metrics.jsonl", "a") as f:  # as the trainer writes a skipped non-finite step
        f.write(json.dumps({"event": "train", "step": 7, "loss": float("nan"), "grad_norm": float("inf")}) + "\n")
        f.write(json.dumps({"event": "eval", "step": 7, "val_loss": float("nan")}) + "\n")
    ui = server_for(runs)

    for path in ("/api/runs", "/api/runs/nan", "/api/compare?runs=nan,other"):
        status, _, response = ui.request("GET", path)
        assert status == 200, path
    status, data = ui.get("/api/runs")
    best = min(r["val_loss"] for r in map(json.loads, (tiny_run / "metrics.jsonl").read_text().splitlines())
               if r["event"] == "eval")  # fmt: skip
    assert {r["name"]: r for r in data["runs"]}["nan"]["best_val_loss"] == pytest.approx(best)
    train = ui.get("/api/compare?runs=nan,other")[1]["runs"]["nan"]["train"]
    assert train[-1] == {"event": "train", "step": 7, "loss": None, "grad_norm": None}

    conn = http.client.HTTPConnection("127.0.0.1", ui.port, timeout=10)
    conn.request("GET", "/api/runs/nan/events")
    response = conn.getresponse()
    line = response.fp.readline().decode()
    while not line.startswith("data: "):
        line = response.fp.readline().decode()
    records = strict_json(line[6:])["records"]
    conn.close()
    assert records[-2]["loss"] is None and records[-1] == {"event": "eval", "step": 7, "val_loss": None}


def test_two_uis_asked_to_start_one_run_name_at_once_start_it_once(tiny_model, tmp_path, server_for):
    runs = tmp_path / "runs"
    train = write_jsonl(tmp_path / "train.jsonl", varied_rows(8))
    uis = [server_for(runs), server_for(runs)]  # two UIs on one runs folder, as two `loratune ui` would be
    body = {"name": "same", "values": {"model": tiny_model, "train_data": train}}
    barrier, answers = threading.Barrier(4), []

    def start(ui):
        barrier.wait()
        answers.append(ui.post("/api/runs", body))

    threads = [threading.Thread(target=start, args=(ui,)) for ui in uis * 2]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(status for status, _ in answers) == [200, 409, 409, 409], answers
        refusals = [data["error"] for status, data in answers if status == 409]
        assert all("same" in e and ("already" in e) for e in refusals), refusals
        assert uis[1].post("/api/runs", body)[0] == 409  # still starting (no folder yet) or running: still refused
    finally:
        kill_children(runs)


def test_the_server_checks_the_run_state_before_resume_merge_and_export(tiny_run, tmp_path, server_for):
    runs = tmp_path / "runs"
    shutil.copytree(tiny_run, runs / "done")
    shutil.copytree(tiny_run, runs / "early")  # stopped before its end: checkpoints, but no adapter yet
    for gone in ("summary.json", "adapter", "last"):
        path = runs / "early" / gone
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    age(runs / "early" / "metrics.jsonl", 3600)
    ui = server_for(runs)
    try:
        status, data = ui.post("/api/runs/done/resume")
        assert status == 409 and "finished" in data["error"] and "does not resume" in data["error"]
        for action in ("merge", "export"):
            status, data = ui.post(f"/api/runs/early/{action}", {"type": "f16"})
            assert status == 409 and f"no adapter to {action}" in data["error"], data
        assert not list(runs.glob(".loratune-ui/jobs/*.json"))  # nothing was started
    finally:
        kill_children(runs)


def test_links_out_of_the_runs_folder_are_not_followed(tiny_run, tmp_path, server_for):
    runs = tmp_path / "runs"
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(tiny_run, elsewhere / "run")
    (elsewhere / "summary.json").write_text(json.dumps({"stop_reason": "SECRET", "best_val_loss": 0.5}))
    runs.mkdir()
    (runs / "linked").symlink_to(elsewhere / "run")  # a run folder that links elsewhere
    shutil.copytree(tiny_run, runs / "real")
    (runs / "real" / "summary.json").unlink()
    (runs / "real" / "summary.json").symlink_to(elsewhere / "summary.json")  # a file that links elsewhere
    (runs / "real" / "metrics.jsonl").unlink()
    (runs / "real" / "metrics.jsonl").symlink_to(elsewhere / "run" / "metrics.jsonl")
    config = (elsewhere / "run" / "config.yaml").read_text()
    (elsewhere / "run" / "config.yaml").write_text(config.replace("max_length: 256", "max_length: 4242"))
    (runs / "real" / "config.yaml").unlink()
    (runs / "real" / "config.yaml").symlink_to(elsewhere / "run" / "config.yaml")
    shutil.copytree(tiny_run, runs / "plain")
    ui = server_for(runs)

    status, data = ui.get("/api/runs")
    assert sorted(r["name"] for r in data["runs"]) == ["plain", "real"]
    assert ui.get("/api/runs/linked")[0] == 404
    status, details = ui.get("/api/runs/real")
    assert status == 200 and details["summary"] is None and details["row"]["step"] == 0
    assert "SECRET" not in json.dumps(details) and "4242" not in json.dumps(details)
    assert ui.get("/api/compare?runs=real,linked")[0] == 404
    status, data = ui.get("/api/compare?runs=real,plain")
    assert status == 200 and data["runs"]["real"]["train"] == [] and "4242" not in json.dumps(data)


def test_bodies_and_uploads_over_their_limits_are_refused(tmp_path, server_for, monkeypatch):
    from loratune.ui import server

    runs = tmp_path / "runs"
    ui = server_for(runs)
    big = json.dumps({"values": {"model": "x" * server.JSON_LIMIT}}).encode()
    status, data, _ = ui.request("POST", "/api/check", raw=big, headers={"Content-Type": "application/json"})
    assert status == 413 and "larger than 1 MiB" in data["error"]

    monkeypatch.setattr(server, "UPLOAD_LIMIT", 1000)
    status, data, _ = ui.request("POST", "/api/upload?name=big.jsonl", raw=b"{}\n" * 400)
    assert status == 413 and "upload 'big.jsonl'" in data["error"]
    conn = http.client.HTTPConnection("127.0.0.1", ui.port, timeout=10)  # chunked: no length declared
    conn.request("POST", "/api/upload?name=big.jsonl", body=iter([b"{}\n" * 300] * 2), headers={"X-Loratune": "1"},
                 encode_chunked=True)  # fmt: skip
    response = conn.getresponse()
    assert response.status == 413 and "larger than" in json.loads(response.read())["error"]
    conn.close()
    assert list((runs / "uploads").iterdir()) == []  # nothing kept, not even half a file
    assert ui.request("POST", "/api/upload?name=small.jsonl", raw=b"{}\n" * 300)[0] == 200


def test_wrong_json_types_get_one_clear_400(tiny_run, tmp_path, server_for):
    runs = tmp_path / "runs"
    shutil.copytree(tiny_run, runs / "done")
    ui = server_for(runs)
    for path in ("/api/check", "/api/plan", "/api/runs"):
        status, data = ui.post(path, {"name": "x", "preset": ["quick"], "values": {}})
        assert (status, data) == (400, {"error": 'preset: expected a preset name, got ["quick"]'}), path
        status, data = ui.post(path, {"name": "x", "values": ["epochs"]})
        assert status == 400 and data["error"].startswith("values: expected a mapping"), path
        status, data = ui.post(path, {"name": "x", "values": {"epochs": [1]}})
        assert data["error"] == "epochs: expected text, a number or true/false", path
        assert status == (200 if path == "/api/check" else 400)  # a check answers what is wrong with the form
    status, data = ui.post("/api/runs/done/export", {"type": 5})
    assert status == 400 and data["error"].startswith("type: expected a GGUF type name")
    for wrong in ({"history": []}, {"history": {"base": "hi"}}, {"max_new_tokens": "many"}, {"message": 5}):
        status, data = ui.post("/api/try", {"run": "done", "message": "hi"} | wrong)
        assert status == 400 and data["error"].split(":")[0] in wrong, data


def try_processes(run: Path) -> list[int]:
    """The live Try it model processes of `run` (a reaped or zombie process has no command line)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            words = (proc / "cmdline").read_bytes().split(b"\0") if proc.name.isdigit() else []
        except OSError:
            continue
        if b"loratune.ui.tryit" in words and str(run).encode() in words:
            found.append(int(proc.name))
    return found


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout}s")


def test_try_keeps_one_model_process_per_run_and_ends_it_when_unused(tiny_run, tmp_path, server_for):
    runs = tmp_path / "runs"
    shutil.copytree(tiny_run, runs / "done")
    ui = server_for(runs)
    run = runs.resolve() / "done"
    body = {"run": "done", "message": "order two mugs", "max_new_tokens": 4}

    conn = http.client.HTTPConnection("127.0.0.1", ui.port, timeout=60)
    conn.request("POST", "/api/try", body=json.dumps(body), headers={"X-Loratune": "1"})
    conn.getresponse()
    wait_for(lambda: try_processes(run), 30, "the model process starts")
    conn.close()  # the page goes away (or times out) while the model loads
    wait_for(lambda: not try_processes(run), 10, "the loading model process ends")

    assert ask(ui, body)[-1] == {"end": True}
    (first,) = try_processes(run)
    ui.app.app.state.ui.workers.idle_seconds = 1
    assert ask(ui, body | {"message": "and a lamp"})[-1] == {"end": True}
    assert try_processes(run) == [first]  # asked again: the same process answers
    wait_for(lambda: not try_processes(run), 10, "the idle model process ends")


def test_an_emptied_field_clears_what_the_preset_set(tmp_path):
    from loratune.core.presets import PRESETS
    from loratune.ui import form

    assert PRESETS["quickstart"].values["test_data"]
    argv, sources = form.train_argv({"test_data": ""}, "quickstart", tmp_path / "run")
    assert "--test-data=" in argv and sources["test_data"] == "--test-data"
    assert form.resolve_form({"test_data": ""}, "quickstart").config.test_data == ""  # training reads it as none


def test_a_running_runs_row_says_what_it_does_now_with_the_time_left(tiny_run, tmp_path, server_for):
    runs = tmp_path / "runs"
    shutil.copytree(tiny_run, runs / "live")  # 6 steps; training now: no summary yet, its metrics fresh
    (runs / "live" / "summary.json").unlink()
    metrics, now = runs / "live" / "metrics.jsonl", time.time()
    test = {"event": "phase", "phase": "test", "text": "answering the held-out test, base model", "step": 0}
    write_jsonl(metrics, [test | {"done": 16, "total": 50, "time": now - 140}])
    ui = server_for(runs)
    row = ui.get("/api/runs/live")[1]["row"]
    assert row["phase"] == {"phase": "test", "text": "answering the held-out test, base model", "done": 16, "total": 50}
    details = ui.get("/api/runs/live")[1]
    assert details["test_data"] and details["samples"] == []  # the page says the answers come at the end

    training = {"event": "phase", "phase": "train", "text": "training", "step": 0, "time": now - 139}
    steps = [{"event": "train", "step": step, "loss": 1.0, "time": now - t} for step, t in ((1, 130), (2, 128))]
    steps += [{"event": "train", "step": step, "loss": 1.0, "time": now - t} for step, t in ((3, 20), (4, 18))]
    with open(metrics, "a") as f:  # 2 s a step, and a stop of 100 s before step 3 (then a resume)
        f.write("".join(json.dumps(r) + "\n" for r in [training, *steps]))
    row = ui.get("/api/runs/live")[1]["row"]
    assert row["phase"] == {"phase": "train", "text": "training step", "done": 4, "total": 6, "eta_seconds": 4.0}
    assert ui.get("/api/runs")[1]["runs"][0]["phase"]["done"] == 4  # the runs list says it too

    # A run this UI (re)started shows "loading" until it writes its first phase line; the old ones do not count.
    proc = subprocess.Popen([sys.executable, "-m", "loratune", "ui", "--runs", str(tmp_path / "other"), "--port", "0"])
    try:
        jobs = runs / ".loratune-ui" / "jobs"
        jobs.mkdir(parents=True)
        argv = ["ui", "--runs", str(tmp_path / "other"), "--port", "0"]  # a live `python -m loratune` process
        record = {"name": "live", "kind": "train", "pid": proc.pid, "argv": argv, "started": time.time()}
        (jobs / "live.train.json").write_text(json.dumps(record))
        row = ui.wait_row("live", lambda r: r["state"] == "running", timeout=30)
        assert row["phase"] == {"phase": "load", "text": "loading the model and data"}
        validating = {"event": "phase", "phase": "validate", "text": "validating at step 4", "step": 4}
        with open(metrics, "a") as f:
            f.write(json.dumps(validating | {"time": time.time() + 1}) + "\n")
        row = ui.wait_row("live", lambda r: r["phase"]["phase"] != "load", timeout=30)
        assert row["phase"] == {"phase": "validate", "text": "validating at step 4", "done": None, "total": None}
    finally:
        proc.kill()
        proc.wait()
    assert ui.get("/api/runs/live")[1]["row"]["phase"] is None  # it ended: no phase
