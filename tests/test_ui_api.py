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
    ui = server_for(runs)

    status, data = ui.get("/api/runs")
    assert status == 200
    rows = {r["name"]: r for r in data["runs"]}
    assert set(rows) == {"bad", "cut", "done", "half"}
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
    (tmp_path / "secret.jsonl").write_text('{"input": "secret", "output": "x"}\n')
    ui = server_for(runs)
    for path in ("/api/runs/..", "/api/runs/%2E%2E", "/api/runs/..%2Fsecret.jsonl", "/api/runs/.loratune-ui",
                 "/api/runs/uploads", "/static/../../secret.jsonl", "/static/%2E%2E/%2E%2E/secret.jsonl",
                 "/api/compare?runs=done,..", "/api/runs/%2Ftmp"):  # fmt: skip
        status, data = ui.get(path)
        assert status == 404, (path, data)
        assert "secret" not in json.dumps(data)
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
    status, r = ui.post("/api/check", {"values": values | {"batch_size": "-2"}})
    assert r["field"] == "batch_size" and "batch_size = '-2'" in r["error"]
    status, r = ui.post("/api/check", {"values": {"train_data": str(tmp_path / "none.jsonl")}})
    assert "file not found" in r["error"]
    status, r = ui.post("/api/plan", {"values": values, "name": "p"})
    assert status == 200 and r["plan"]["fits"] and r["inspect"]["recommended"]
    assert r["inspect"]["histogram"] and not (tmp_path / "runs" / "p").exists()


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


def test_try_streams_the_fine_tuned_then_the_base_answer(tiny_run, tmp_path, server_for):
    runs = tmp_path / "runs"
    shutil.copytree(tiny_run, runs / "done")
    ui = server_for(runs)
    body = {"run": "done", "message": "order two mugs", "max_new_tokens": 12, "history": {}}
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
    assert events[0]["ready"] and not any("error" in e for e in events)
    done = [i for i, e in enumerate(events) if e.get("done")]
    assert [events[i]["side"] for i in done] == ["fine-tuned", "base"]
    pieces = [e for e in events[: done[0]] if e.get("side") == "fine-tuned" and "text" in e]
    assert len(pieces) > 1  # streamed piece by piece, not in one go
    assert "".join(p["text"] for p in pieces).strip() == events[done[0]]["text"]
