"""Starting the server: the address (loopback unless asked), the token when exposed, and the URL to open."""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import secrets
import socket
from pathlib import Path

from ..core.errors import UserError

TOKEN_ENV = "LORATUNE_UI_TOKEN"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the server starts, so a taken port is one clear line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        reason = e.strerror or e
        raise UserError(f"cannot listen on {host}:{port} ({reason}); choose another --port or --host") from None
    sock.listen(128)
    sock.set_inheritable(False)  # the training processes it starts must not hold the port
    return sock


def serve(runs: Path, host: str = "127.0.0.1", port: int = 7860, token: str | None = None) -> None:
    """Serve the UI for the runs folder `runs` until Ctrl-C; the runs it started go on."""
    missing = [m for m in ("starlette", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"loratune ui needs {' and '.join(missing)}: pip install 'loratune[ui]'")
    import uvicorn

    from .server import create_app

    if runs.exists() and not runs.is_dir():
        raise UserError(f"--runs {runs}: not a folder")
    runs.mkdir(parents=True, exist_ok=True)
    token = token or os.environ.get(TOKEN_ENV) or (None if is_loopback(host) else secrets.token_urlsafe(24))
    sock = bind(host, port)
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    hosts = None if not is_loopback(host) else {f"{h}:{port}" for h in ("127.0.0.1", "localhost", "[::1]", shown)}
    app = create_app(runs, token=token, hosts=hosts)
    where = socket.gethostname() if host in ("0.0.0.0", "::") else shown
    url = f"http://{where}:{port}/" + (f"?token={token}" if token else "")
    print(f"loratune ui: {url}  (runs folder {runs.resolve()}; Ctrl-C stops the UI, not the runs)", flush=True)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2, access_log=False)
    uvicorn.Server(config).run(sockets=[sock])
