"""Who may talk to the app: the token on every request (when there is one), only this machine's own names in the
Host header (when listening on loopback: a web page cannot rebind its domain onto us), and a header that a form
on another site cannot send on every request that changes something."""

from __future__ import annotations

import json
import secrets
from http.cookies import CookieError, SimpleCookie
from urllib.parse import parse_qs

COOKIE = "loratune_ui_token"
WRITE_HEADER = b"x-loratune"  # the page sends it; a cross-site form cannot, and fetch would need our CORS consent
SECURITY_HEADERS = [
    # Every asset is served from here: nothing loads from elsewhere, and no inline script runs.
    (b"content-security-policy", b"default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),  # the token in the first URL stays here
    (b"x-frame-options", b"DENY"),
]


class Guard:
    """ASGI middleware in front of the app (plain ASGI, so streamed responses stream)."""

    def __init__(self, app, token: str | None, hosts: set[str] | None):
        self.app, self.token, self.hosts = app, token, hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.lower(): v for k, v in scope["headers"]}
        if self.hosts is not None and headers.get(b"host", b"").decode("latin-1") not in self.hosts:
            return await _refuse(send, 403, "unknown Host header: open the address loratune ui printed")
        set_cookie = False
        if self.token is not None:
            given = _given_token(scope, headers)
            if given is None or not secrets.compare_digest(given.encode(), self.token.encode()):
                return await _refuse(send, 401, "token required: open the address loratune ui printed")
            set_cookie = COOKIE.encode() not in headers.get(b"cookie", b"")
        if scope["method"] not in ("GET", "HEAD") and headers.get(WRITE_HEADER) != b"1":
            return await _refuse(send, 403, "requests that change something come from the loratune ui page only")

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                extra = list(SECURITY_HEADERS)
                if set_cookie:
                    cookie = f"{COOKIE}={self.token}; HttpOnly; SameSite=Strict; Path=/"
                    extra.append((b"set-cookie", cookie.encode()))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _given_token(scope, headers: dict) -> str | None:
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    if query.get("token"):
        return query["token"][0]
    auth = headers.get(b"authorization", b"").decode("latin-1")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    cookie = SimpleCookie()
    try:
        cookie.load(headers.get(b"cookie", b"").decode("latin-1"))
    except CookieError:  # a malformed Cookie header is the same as none
        return None
    return cookie[COOKIE].value if COOKIE in cookie else None


async def _refuse(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
