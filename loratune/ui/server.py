"""The web app: a JSON API over the runs folder, server-sent events for live views, and the static page.

Nothing here reads or writes outside the runs folder, except the data files and model the user names for a run
(read by plan, inspect and the training it starts). Run names in URLs are single folder names, checked before use.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from contextlib import asynccontextmanager
from functools import wraps
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..core.errors import UserError
from ..core.sources import read_run_config
from ..training.charts import charts_json
from . import form
from .guard import Guard
from .jobs import STATE_DIR, Conflict, Jobs
from .runs import RESERVED, MetricsLog, Runs, inside
from .tryit import TryWorkers

STATIC = Path(__file__).parent / "static"
POLL_SECONDS = 0.5  # live views see a new metrics line within this (plus the page's own drawing)
PING_SECONDS = 15
UPLOAD_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
# The page's requests are small (a form, a conversation); a training file larger than an upload can be is named by
# its path instead, which the UI (on this machine) reads as the CLI does.
JSON_LIMIT = 1 << 20
UPLOAD_LIMIT = 100 << 20


class NotFound(UserError):
    pass


class TooLarge(UserError):
    pass


STATUS = {NotFound: 404, Conflict: 409, TooLarge: 413}


class State:
    """The app's view of one runs folder."""

    def __init__(self, root: Path):
        self.root = root.resolve()
        self.jobs = Jobs(self.root)
        self.runs = Runs(self.root, self.jobs)
        self.workers = TryWorkers(self.root / STATE_DIR / "try.log")
        self.lock = threading.Lock()  # the runs' cached metrics are shared by every request

    def rows(self) -> list[dict]:
        with self.lock:
            rows = [self.runs.row(name) for name in self.runs.names()]
        return sorted(rows, key=lambda r: r["started"] or 0, reverse=True)  # the newest first

    def run(self, name: str) -> Path:
        """The folder of an existing run: `name` must be one of the runs' names (each one folder of the runs
        folder, or a sweep's trial folder in one, never any other path)."""
        if not isinstance(name, str) or name not in self.runs.names():
            raise NotFound(f"no run named {name!r} in {self.root}")
        return self.root / name

    def running(self, but: str | None = None) -> list[str]:
        return [r["name"] for r in self.rows() if r["state"] == "running" and r["name"] != but]


def api(handler):
    """A JSON endpoint: a UserError becomes {"error": line} with 400 (or its STATUS: an unknown run, a refusal by
    the run's state, a body too large)."""

    @wraps(handler)
    async def wrapped(request: Request):
        try:
            return await handler(request, request.app.state.ui)
        except UserError as e:
            return JSONResponse({"error": str(e)}, STATUS.get(type(e), 400))

    return wrapped


async def _limited(request: Request, limit: int, what: str):
    """The request body's chunks, refused (413) once it passes `limit` bytes: a declared length at once, a chunked
    body as it arrives."""
    too_large = TooLarge(f"{what} is larger than {limit >> 20} MiB")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        yield chunk


async def _body(request: Request) -> dict:
    raw = b"".join([chunk async for chunk in _limited(request, JSON_LIMIT, "the request body")])
    try:
        body = json.loads(raw)
    except ValueError:
        raise UserError("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise UserError("the request body must be a JSON object")
    return body


def _get(body: dict, key: str, kinds: tuple[type, ...], what: str, default=None):
    """body[key] when it is one of `kinds` (or absent: `default`), else a 400 saying what was expected."""
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
        raise UserError(f"{key}: expected {what}, got {json.dumps(value)[:60]}")
    return value


def _form_body(body: dict) -> tuple[dict, str | None]:
    """The new-run form's settings and preset, of the types the page sends."""
    values = _get(body, "values", (dict,), "a mapping of setting names to values", {})
    return values, _get(body, "preset", (str,), "a preset name")


def _sse(request: Request, produce) -> StreamingResponse:
    """Server-sent events: `produce()` (run in a thread) returns the events due now; polled until the page goes."""

    async def stream():
        quiet = 0.0
        while not await request.is_disconnected():
            events = await run_in_threadpool(produce)
            for event in events:
                yield f"data: {json.dumps(event)}\n\n"
            quiet = 0.0 if events else quiet + POLL_SECONDS
            if quiet >= PING_SECONDS:  # keeps proxies from closing an idle stream
                yield ": ping\n\n"
                quiet = 0.0
            await asyncio.sleep(POLL_SECONDS)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# --- Runs ----------------------------------------------------------------------------------------------------


@api
async def list_runs(request: Request, ui: State):
    return JSONResponse({"root": str(ui.root), "runs": await run_in_threadpool(ui.rows)})


@api
async def runs_events(request: Request, ui: State):
    last = [None]

    def produce():
        rows = ui.rows()
        if rows == last[0]:
            return []
        last[0] = rows
        return [{"type": "runs", "runs": rows}]

    return _sse(request, produce)


@api
async def run_details(request: Request, ui: State):
    name = request.path_params["name"]
    ui.run(name)

    def details():
        with ui.lock:
            return ui.runs.details(name)

    return JSONResponse(await run_in_threadpool(details))


@api
async def run_events(request: Request, ui: State):
    """The run's metrics records as they are written (all of them first), and its row whenever it changes."""
    name = request.path_params["name"]
    folder = ui.run(name)
    log, last = MetricsLog(folder / "metrics.jsonl", ui.root), [None]

    def produce():
        events = []
        records, reset = log.update()
        if records or reset:
            charts = charts_json(log.records)
            events.append({"type": "metrics", "records": records, "reset": reset, "charts": charts})
        with ui.lock:
            row = ui.runs.row(name) if name in ui.runs.names() else {"name": name, "state": "gone", "exists": False}
        if row != last[0]:
            last[0] = row
            events.append({"type": "row", "row": row})
        return events

    return _sse(request, produce)


@api
async def stop_run(request: Request, ui: State):
    name = request.path_params["name"]
    ui.run(name)
    ui.jobs.stop(name)
    return JSONResponse({"stopping": name})


@api
async def resume_run(request: Request, ui: State):
    name = request.path_params["name"]
    folder = ui.run(name)

    def resumable():  # checked as no other start can change it
        state = ui.runs.state(name)
        if state.state == "running":
            raise Conflict(f"{name} is running")
        if state.state == "done":
            raise Conflict(f"{name} has finished ({state.why}): a finished run does not resume; start a new run")
        if not ui.runs.checkpoints(name) and not (folder / "config.yaml").is_file():
            raise Conflict(f"{name}: nothing to resume (no checkpoint and no config.yaml)")

    previous = ui.jobs.get(name)
    argv = ["train", "--resume", str(folder)]
    job = ui.jobs.start(name, "train", argv, previous.sources if previous else None, check=resumable)
    return JSONResponse({"name": name, "command": job.command, "warning": _shared_warning(ui, name)})


@api
async def merge_run(request: Request, ui: State):
    name = request.path_params["name"]
    folder = ui.run(name)
    _need_adapter(ui, name, "merge")
    out = ui.root / "merged" / name
    job = ui.jobs.start(name, "merge", ["merge", str(folder), "--out", str(out), "--overwrite"])
    return JSONResponse({"name": name, "command": job.command, "out": str(out)})


@api
async def export_run(request: Request, ui: State):
    """`loratune export RUN --format gguf --type T`: the file and its Modelfile go into the run folder, as the CLI
    writes them by default; the CLI checks the type and says what is wrong."""
    name = request.path_params["name"]
    folder = ui.run(name)
    kind = _get(await _body(request), "type", (str,), "a GGUF type name", "f16")
    _need_adapter(ui, name, "export")
    argv = ["export", str(folder), "--format", "gguf", "--type", kind, "--overwrite"]
    job = ui.jobs.start(name, "export", argv)
    return JSONResponse({"name": name, "command": job.command})


def _need_adapter(ui: State, name: str, action: str) -> None:
    if "adapter" not in ui.runs.adapters(name):
        raise Conflict(f"{name}: no adapter to {action} yet (the best adapter is written at the end of training)")


def _shared_warning(ui: State, name: str) -> str | None:
    others = ui.running(but=name)
    if not others:
        return None
    return (
        f"{', '.join(others)} {'is' if len(others) == 1 else 'are'} training too: the runs share this machine's "
        "CPU and GPU, so each one goes slower (and memory plans assumed one run)"
    )


# --- New run -------------------------------------------------------------------------------------------------


@api
async def form_schema(request: Request, ui: State):
    taken = set(await run_in_threadpool(ui.runs.names))
    suggested = next(f"run-{i}" for i in range(1, len(taken) + 2) if f"run-{i}" not in taken)
    running = await run_in_threadpool(ui.running)
    return JSONResponse(form.schema() | {"root": str(ui.root), "suggested_name": suggested, "running": running})


@api
async def check_form(request: Request, ui: State):
    values, preset = _form_body(await _body(request))
    return JSONResponse(await run_in_threadpool(form.check, values, preset))


@api
async def plan_form(request: Request, ui: State):
    body = await _body(request)
    values, preset = _form_body(body)
    out = form.check_run_name(body.get("name"), ui.root, RESERVED)
    plan = await run_in_threadpool(form.plan_and_inspect, values, preset, out)
    return JSONResponse(plan)


@api
async def start_run(request: Request, ui: State):
    body = await _body(request)
    values, preset = _form_body(body)
    name = body.get("name")
    out = form.check_run_name(name, ui.root, RESERVED)
    argv, sources = await run_in_threadpool(form.train_argv, values, preset, out)
    warning = _shared_warning(ui, name)
    # Checked again as no other start (another tab, another UI on this runs folder) can take the name meanwhile.
    job = ui.jobs.start(name, "train", argv, sources, check=lambda: form.check_run_name(name, ui.root, RESERVED))
    return JSONResponse({"name": name, "command": job.command, "warning": warning})


@api
async def upload(request: Request, ui: State):
    """A data file into RUNS/uploads/ (a new name when one is taken); returns its path for the form."""
    name = Path(request.query_params.get("name", "")).name
    if not form.RUN_NAME.fullmatch(name) or not name.endswith(UPLOAD_SUFFIXES):
        raise UserError(
            f"upload {name!r}: a file name of letters, digits, '.', '_', '-' ending in {', '.join(UPLOAD_SUFFIXES)}"
        )
    folder = ui.root / "uploads"
    folder.mkdir(parents=True, exist_ok=True)
    stem, suffix, n = name[: -len(Path(name).suffix)], Path(name).suffix, 1
    target = folder / name
    while target.exists():
        n += 1
        target = folder / f"{stem}-{n}{suffix}"
    tmp = folder / f".{target.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            async for chunk in _limited(request, UPLOAD_LIMIT, f"upload {name!r}"):
                f.write(chunk)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return JSONResponse({"path": str(target)})


# --- Compare and Try ---------------------------------------------------------------------------------------------


@api
async def compare(request: Request, ui: State):
    names = [n for n in request.query_params.get("runs", "").split(",") if n]
    if len(names) < 2:
        raise UserError("compare: pick two or more runs")

    def gather():
        out, configs = {}, {}
        for name in names:
            folder = ui.run(name)
            log = MetricsLog(folder / "metrics.jsonl", ui.root)
            log.update()
            charts = charts_json(log.records)
            out[name] = {"train": log.train, "evals": log.evals, "charts": charts}
            try:
                linked_out = not inside(ui.root, folder / "config.yaml")
                configs[name] = {} if linked_out else read_run_config(folder).model_dump(mode="json")
            except (UserError, ValueError, OSError):
                configs[name] = {}
        fields = sorted({k for c in configs.values() for k in c})
        differences = [
            {"name": k, "values": {n: configs[n].get(k) for n in names}}
            for k in fields
            if len({json.dumps(configs[n].get(k)) for n in names}) > 1
        ]
        return {"runs": out, "differences": differences}

    return JSONResponse(await run_in_threadpool(gather))


@api
async def try_it(request: Request, ui: State):
    """The run's fine-tuned and base model answer one message, streamed as server-sent events."""
    body = await _body(request)
    name = body.get("run")
    folder = ui.run(name)
    adapter = _get(body, "adapter", (str,), "an adapter name", "adapter")
    checkpoints = {p.name: p / "adapter" for p in ui.runs.checkpoints(name)}
    if adapter not in (*ui.runs.adapters(name), *checkpoints):
        raise UserError(f"adapter {adapter!r}: one of adapter, last, or a checkpoint of this run")
    chosen = str(checkpoints[adapter]) if adapter in checkpoints else adapter
    message = _get(body, "message", (str,), "text", "")
    if not message.strip():
        raise UserError("write a message first")
    history = _get(body, "history", (dict,), "a mapping of side to turns", {})
    turns = [t for side in history.values() for t in (side if isinstance(side, list) else [None])]
    if not all(isinstance(t, dict) and isinstance(t.get("content"), str) for t in turns):
        raise UserError("history: expected each side's turns as a list of {role, content}")
    request_body = {
        "message": message,
        "history": history,
        "max_new_tokens": _get(body, "max_new_tokens", (int,), "a whole number", 128),
        "temperature": _get(body, "temperature", (int, float), "a number", 0.0),
    }

    async def stream():
        async for message in ui.workers.ask(folder, chosen, request_body):
            yield f"data: {json.dumps(message)}\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def index(request: Request):
    return FileResponse(STATIC / "index.html")


async def no_icon(request: Request):
    return Response(status_code=204)


def create_app(runs: Path, token: str | None = None, hosts: set[str] | None = None) -> Guard:
    """The app for one runs folder; `token`: required on every request; `hosts`: the Host headers accepted."""
    ui = State(runs)

    @asynccontextmanager
    async def lifespan(app):
        yield
        await ui.workers.close()

    routes = [
        Route("/", index),
        Route("/favicon.ico", no_icon),
        Route("/api/runs", list_runs),
        Route("/api/runs", start_run, methods=["POST"]),
        Route("/api/events", runs_events),
        # A sweep's trial is SWEEP/TRIAL: a name may hold one '/', so each action is matched before the bare name.
        Route("/api/runs/{name:path}/events", run_events),
        Route("/api/runs/{name:path}/stop", stop_run, methods=["POST"]),
        Route("/api/runs/{name:path}/resume", resume_run, methods=["POST"]),
        Route("/api/runs/{name:path}/merge", merge_run, methods=["POST"]),
        Route("/api/runs/{name:path}/export", export_run, methods=["POST"]),
        Route("/api/runs/{name:path}", run_details),
        Route("/api/form", form_schema),
        Route("/api/check", check_form, methods=["POST"]),
        Route("/api/plan", plan_form, methods=["POST"]),
        Route("/api/upload", upload, methods=["POST"]),
        Route("/api/compare", compare),
        Route("/api/try", try_it, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC)),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.ui = ui
    return Guard(app, token=token, hosts=hosts)
