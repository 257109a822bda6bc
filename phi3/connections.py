"""Bounds on the server's connections, in count and in time, below the HTTP app (uvicorn's h11 protocol).

    accept ─► count < max_connections? ─ no ─► evict the oldest connection that has no request in the
       │                                      app (headers pending, then body pending), or refuse: 503
       ▼
    headers ─(header_timeout)─► body ─(body_timeout)─► the app answers (no limit: a long generation)
       ▲                                                          │
       └──── keep-alive: uvicorn's timeout_keep_alive, then closed ◄┘

uvicorn has the keep-alive timeout and `limit_concurrency` (a 503 only once a request's headers are
in: slow headers hold their socket forever), but no header or body timeout and no bound on open
sockets; a process past its file limit fails `accept()` with EMFILE and asyncio logs it with a
traceback, again and again. So: `Connection` subclasses uvicorn's h11 protocol with one deadline per
phase and a cap on open connections computed below the file limit, and `quiet_accept_errors` turns
the EMFILE traceback into one warning line per `LOG_EVERY` seconds. A new connection at the cap takes
the place of the oldest one that has not sent a whole request (a slow-loris connection), so 300
of those cannot keep a real client out; only when every connection has a request in the app is the
new one refused with 503.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import time
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("uvicorn.error")

LOG_EVERY = 10.0  # seconds between two lines about the same kind of dropped connection
MAX_HEADER_BYTES = 16 * 1024  # h11's default: a request line and headers larger than this get a 400
_RESERVED_FILES = 64  # file descriptors kept for the model's files, logs and the engine


@dataclass(frozen=True)
class Limits:
    """`max_connections`: open sockets at most; `header_timeout`: seconds for a request's line and
    headers (from the connection's start or the previous answer); `body_timeout`: seconds for its body."""

    max_connections: int
    header_timeout: float = 10.0
    body_timeout: float = 60.0

    def __post_init__(self):
        if not isinstance(self.max_connections, int) or isinstance(self.max_connections, bool) \
                or self.max_connections < 1:
            raise ValueError(f"max_connections must be an integer >= 1, got {self.max_connections!r}")
        for name in ("header_timeout", "body_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")


def connection_cap(requested: int | None = None) -> int:
    """`requested`, or by default the process's file limit less what the rest of the process needs
    (at most 4096); a ValueError when `requested` would reach the file limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    fit = (soft if soft != resource.RLIM_INFINITY else 1 << 20) - _open_files() - _RESERVED_FILES
    if requested is None:
        if fit < 8:
            raise ValueError(f"the file limit ({soft}) leaves no room for connections; raise it (ulimit -n)")
        return min(fit, 4096)
    if requested > fit:
        raise ValueError(f"max_connections {requested} does not fit the file limit ({soft} open files, "
                         f"{soft - fit} needed by the rest of the server); raise it (ulimit -n) or lower it")
    return requested


def _open_files() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux
        return 16


def protocol(limits: Limits) -> type[Connection]:
    """uvicorn's `http` protocol class for a server bound by `limits`."""
    return type("BoundedConnection", (Connection,), {"limits": limits})


class Connection(H11Protocol):
    """One HTTP/1.1 connection: uvicorn's h11 protocol with a deadline per phase and a shared cap."""

    limits: Limits

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.opened, self._phase, self._deadline = time.monotonic(), None, None
        if len(self.connections) > self.limits.max_connections and not _evict(self.connections, self):
            _note("refused", "connections at the cap (%d), each with a request in progress: refused with 503",
                  self.limits.max_connections)
            self._close_with(503, "the server has too many open connections; retry shortly")
            return
        self._watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def connection_lost(self, exc) -> None:
        self._set_deadline(None)
        super().connection_lost(exc)

    def waiting(self) -> str | None:
        """'headers' or 'body' while the client owes us (part of) a request, else None."""
        theirs = self.conn.their_state
        if self.transport.is_closing():
            return None
        return "headers" if theirs is h11.IDLE else "body" if theirs is h11.SEND_BODY else None

    def _watch(self) -> None:
        """Start the phase's clock when the phase changes (not on every byte: a trickle does not reset it)."""
        phase = self.waiting()
        if phase != self._phase:
            self._phase = phase
            timeout = {"headers": self.limits.header_timeout, "body": self.limits.body_timeout}.get(phase)
            self._set_deadline(timeout)

    def _set_deadline(self, timeout: float | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = None if timeout is None else self.loop.call_later(timeout, self._expire)

    def _expire(self) -> None:
        self._deadline = None
        phase = self.waiting()
        if phase == "headers" and self.conn.our_state is h11.IDLE:
            _note("header_timeout", "closed a connection that sent no whole request line and headers within "
                  "%g s", self.limits.header_timeout)
            self._close_with(408, f"no whole request within {self.limits.header_timeout:g} s")
        elif phase == "body":  # the app is reading it: it sees a disconnect
            _note("body_timeout", "closed a connection whose request body took longer than %g s",
                  self.limits.body_timeout)
            self.transport.close()

    def _close_with(self, status: int, message: str) -> None:
        """Answer outside the request cycle (no request, or none read yet) and close."""
        body = json.dumps({"error": {"message": message, "type": "server_error" if status >= 500 else
                                     "invalid_request_error", "param": None, "code": None}}).encode()
        reason = {408: b"Request Timeout", 503: b"Service Unavailable"}[status]
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n%s" % (status, reason, len(body), body))
        self.transport.close()


def _evict(connections: set, newcomer: Connection) -> bool:
    """Close the oldest connection still owing headers (else a body) to make room; False if none does."""
    for phase in ("headers", "body"):
        owing = [c for c in connections if c is not newcomer and isinstance(c, Connection) and c.waiting() == phase]
        if owing:
            oldest = min(owing, key=lambda c: c.opened)
            _note("evicted", "connections at the cap: closed the oldest one still sending its request")
            oldest.transport.close()
            return True
    return False


_last: dict[str, tuple[float, int]] = {}  # kind -> (when its last line was logged, how many since)


def _note(kind: str, message: str, *args) -> None:
    """Log `message` once per LOG_EVERY seconds per kind, with the count of those left out."""
    now = time.monotonic()
    when, left_out = _last.get(kind, (-LOG_EVERY, 0))
    if now - when < LOG_EVERY:
        _last[kind] = (when, left_out + 1)
        return
    _last[kind] = (now, 0)
    log.warning(message + (f" ({left_out} more like it since the last such line)" if left_out else ""), *args)


def quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Make `accept()` failures (EMFILE: out of file descriptors) one rate-limited line, not a traceback each."""
    default = loop.get_exception_handler()

    def handler(loop, context):
        exc = context.get("exception")
        if context.get("message", "").startswith("socket.accept() out of system resource"):
            _note("accept", "cannot accept connections: %s (new ones wait in the listen queue)", exc)
        elif default is not None:
            default(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
