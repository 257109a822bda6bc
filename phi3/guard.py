"""What the server checks of every request before its routes (an ASGI middleware, outermost).

    request ─► framing: Content-Length and Transfer-Encoding both? ─► 400, connection closed
            ─► Host in allowed_hosts? (DNS rebinding) ─► else 403
            ─► Origin in allowed_origins? (other web pages) ─► else 403; CORS preflight answered
            ─► HEAD runs as GET (uvicorn sends no body); a trailing '/' is dropped (no redirect)
            ─► the app (API key, routes)

Why: a server on 127.0.0.1 with no API key is reachable from any web page the user opens. A page
can POST to it as a CORS "simple request" (no preflight; the JSON routes' 415 for a Content-Type
other than application/json closes that), or point a DNS name it controls at 127.0.0.1 and read
the answers as same-origin (closed by the Host check, which Jupyter and Ollama also do). Browsers
send `Origin` on every cross-origin request, API clients (SDKs, curl) do not; so a request whose
Origin is not allowed is refused, and one that is gets CORS headers, so a browser UI the user
trusts can call the server (`--allowed-origins`).
"""

from __future__ import annotations

import ipaddress
import json

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
_ALLOWED_METHODS = b"GET, HEAD, POST, OPTIONS"


def host_name(host: str) -> str:
    """The name of a Host header without its port: 'a.b:80' -> 'a.b', '[::1]:80' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback(host: str) -> bool:
    """Whether a bind address is this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Guard:
    """The checks above around `app`. `allowed_hosts`: Host names accepted (None: any; '*' in it: any);
    `allowed_origins`: Origins that may call from a browser ('*': any)."""

    def __init__(self, app, *, allowed_hosts, allowed_origins):
        self.app = app
        self.hosts = None if allowed_hosts is None or "*" in allowed_hosts else {host_name(h) for h in allowed_hosts}
        self.any_origin = "*" in allowed_origins
        self.origins = {o.rstrip("/").lower() for o in allowed_origins}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {}
        for k, v in scope["headers"]:
            headers.setdefault(k, v)
        if b"transfer-encoding" in headers and b"content-length" in headers:  # RFC 9112 §6.3: smuggling
            return await _refuse(send, 400, "a request must not have both Content-Length and Transfer-Encoding",
                                 "invalid_framing", close=True)
        host = headers.get(b"host", b"").decode("latin-1")
        if self.hosts is not None and host_name(host) not in self.hosts:
            return await _refuse(send, 403, f"the Host {host[:100]!r} is not allowed; start the server with "
                                 "--allowed-hosts NAME to allow it", "host_not_allowed")
        origin = headers.get(b"origin")
        cors = []
        if origin is not None:
            if not (self.any_origin or origin.decode("latin-1").rstrip("/").lower() in self.origins):
                return await _refuse(send, 403, f"requests from the web page origin {origin.decode('latin-1')[:100]!r}"
                                     " are not allowed; start the server with --allowed-origins ORIGIN to allow it",
                                     "origin_not_allowed")
            cors = [(b"access-control-allow-origin", b"*" if self.any_origin else origin), (b"vary", b"Origin")]
            if scope["method"] == "OPTIONS" and b"access-control-request-method" in headers:  # a preflight
                asked = headers.get(b"access-control-request-headers", b"authorization, content-type")
                await send({"type": "http.response.start", "status": 204, "headers": cors + [
                    (b"access-control-allow-methods", _ALLOWED_METHODS), (b"access-control-allow-headers", asked),
                    (b"access-control-max-age", b"600")]})
                return await send({"type": "http.response.body", "body": b""})
        path = scope["path"]
        if len(path) > 1 and path.endswith("/"):  # /v1/models/ is /v1/models: no redirect
            scope = {**scope, "path": path.rstrip("/") or "/"}
        if scope["method"] == "HEAD":  # routed as GET; uvicorn sends the headers only (it saw HEAD)
            scope = {**scope, "method": "GET"}
        if cors:
            await self.app(scope, receive, _with_headers(send, cors))
        else:
            await self.app(scope, receive, send)


def _with_headers(send, extra: list[tuple[bytes, bytes]]):
    async def wrapped(message):
        if message["type"] == "http.response.start":
            message = {**message, "headers": list(message.get("headers", [])) + extra}
        await send(message)
    return wrapped


async def _refuse(send, status: int, message: str, code: str, close: bool = False) -> None:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status,
                "headers": headers + ([(b"connection", b"close")] if close else [])})
    await send({"type": "http.response.body", "body": body})
