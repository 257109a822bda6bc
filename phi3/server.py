"""An OpenAI-compatible HTTP server over the engine: FastAPI routes, validation, SSE, errors.

    handler: read body (413) ─► validate (openai_api: 400) ─► model (404) ─► encode, off the event
        loop ─► context check (400) ─► Backend.open (429) ─► Job.chunks() ─► a JSON body or SSE chunks

The server has no decode loop of its own (see backend.py): requests become `SamplingParams` and
engine requests, and their text comes from the same `TextStream` as `LLM.generate`'s, so a
request's text is the one `LLM.generate` gives. The engine owns the KV cache, one pool of blocks
allocated at start-up (`kv_cache_tokens` positions, by default from free memory) shared by up to
`max_batch` rows, with automatic prefix caching (a chat's next turn, a shared system prompt). Requests
beyond the free rows or blocks wait in the engine's queue, which holds at most `max_queue` (then 429
with Retry-After). /health reports rows, blocks and prefix-cache hits; /metrics the same in
Prometheus' text format.

Faults: a client that goes away (stream or not) cancels its requests, which frees their slots at
the next step. SIGTERM stops accepting connections, lets the requests in flight finish for
`drain_timeout` seconds, ends those still running with an in-band error, and exits 0. If the
engine raises, every request in flight gets an error, /health turns 503 and the process exits 1.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from . import connections
from . import openai_api as api
from .backend import Backend, Job, log
from .cache import kv_dtype_of
from .generate import LLM
from .guard import LOOPBACK_HOSTS, Guard, is_loopback
from .openai_api import APIError
from .speculate import parse as parse_speculation
from .tools import CallStream

MAX_BODY = 4 * 2**20  # bytes of a request body (a 128k-token prompt is ~0.5 MB)
PUBLIC_PATHS = {"/health"}  # every other path needs the API key, when one is set


# -- the app ---------------------------------------------------------------------------------------
def create_app(model: LLM | Callable[[], LLM], *, name: str, api_key: str | None = None, max_batch: int = 8,
               max_queue: int = 256, max_len: int | None = None, drain_timeout: float = 30.0,
               kv_cache_tokens: int | None = None, prefix_cache: bool = True,
               allowed_hosts: list[str] | None = None, allowed_origins: list[str] = (),
               speculate=None, kv_cache_dtype: str = "auto") -> FastAPI:
    """The ASGI app serving `model` (an `LLM`, or a function that loads one: it runs on the engine
    thread at start-up, and /health says 503 until it returns) as `name`. `allowed_hosts`: the Host
    names it answers (None: any); `allowed_origins`: web page origins that may call it (see guard.py);
    `speculate`: every request's speculative decoding ("ngram[:K[:N]]", a draft model "MODEL[:K]" or an
    `LLM`, "layers:N[:K]": phi3.speculate; None: off)."""
    _check_options(name, max_batch, max_queue, max_len, drain_timeout, kv_cache_tokens)
    kv_dtype_of(kv_cache_dtype)  # a bad name fails now, not once loaded
    speculate = parse_speculation(speculate)  # a bad one fails now; a draft model's name, once the model is loaded
    backend = Backend((lambda: model) if isinstance(model, LLM) else model, name=name,
                      max_batch=max_batch, max_queue=max_queue, max_len=max_len, drain_timeout=drain_timeout,
                      kv_cache_tokens=kv_cache_tokens, prefix_cache=prefix_cache, speculate=speculate,
                      kv_cache_dtype=kv_cache_dtype)

    @asynccontextmanager
    async def lifespan(app):
        backend.start(asyncio.get_running_loop())
        yield
        backend.stop()

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.backend = backend
    app.state.speculate = speculate
    if api_key:
        app.add_middleware(_APIKey, key=api_key)
    app.add_middleware(Guard, allowed_hosts=allowed_hosts, allowed_origins=list(allowed_origins))  # outermost
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(Exception, _internal_error)

    @app.get("/health")
    async def health():
        body = {"status": backend.status, "model": name}
        if backend.engine is not None:
            stats = backend.engine.stats()
            body.update(slots=backend.slots, max_len=backend.max_len, running=stats.pop("running"),
                        waiting=stats.pop("waiting"), finished=dict(backend.finished), kv_cache=stats)
        if backend.warnings:  # what this machine lacks that costs speed (phi3.machine)
            body["warnings"] = backend.warnings
        return JSONResponse(body, status_code=200 if backend.status == "ok" else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(_prometheus(backend), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_card(name)]}

    @app.get("/v1/models/{model:path}")
    async def model_card(model: str):
        _check_model(model, name)
        return _card(name)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await _complete(request, backend, api.Chat)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _complete(request, backend, api.Completions)

    return app


def _prometheus(backend: Backend) -> str:
    """The engine's counters in Prometheus' text exposition format (names as vLLM's where they exist)."""
    if backend.engine is None:
        return "# the model is still loading\n"
    stats, lines = backend.engine.stats(), []

    def metric(name: str, kind: str, help: str, value, labels: str = "") -> None:
        if not any(line.startswith(f"# TYPE phi3:{name} ") for line in lines):
            lines.extend([f"# HELP phi3:{name} {help}", f"# TYPE phi3:{name} {kind}"])
        lines.append(f"phi3:{name}{labels} {value}")

    metric("num_requests_running", "gauge", "Sequences holding a row.", stats["running"])
    metric("num_requests_waiting", "gauge", "Sequences waiting for a row or KV blocks.", stats["waiting"])
    for state in ("used", "cached", "free"):
        metric("kv_cache_blocks", "gauge", f"KV cache blocks of {stats['block_size']} tokens, by state.",
               stats[f"blocks_{state}"], f'{{state="{state}"}}')
    metric("kv_cache_usage_perc", "gauge", "Share of KV cache blocks held by sequences.",
           round(stats["blocks_used"] / max(1, stats["blocks_total"]), 6))
    metric("prompt_tokens_total", "counter", "Prompt tokens admitted.", stats["prompt_tokens"])
    metric("prefix_cache_hit_tokens_total", "counter", "Prompt tokens whose keys came from the prefix cache.",
           stats["prefix_hit_tokens"])
    metric("num_preemptions_total", "counter", "Sequences preempted when the KV cache ran out.", stats["preempted"])
    metric("spec_decode_num_draft_tokens_total", "counter", "Tokens guessed by speculative decoding.",
           stats["draft_tokens"])
    metric("spec_decode_num_accepted_tokens_total", "counter", "Guessed tokens that the model's own draws confirmed.",
           stats["accepted_tokens"])
    for reason, count in sorted(backend.finished.items()):
        metric("request_success_total", "counter", "Sequences finished, by reason.", count,
               f'{{finished_reason="{reason}"}}')
    return "\n".join(lines) + "\n"


def _check_options(name, max_batch, max_queue, max_len, drain_timeout, kv_cache_tokens=None) -> None:
    def whole(value, lo):
        return isinstance(value, int) and not isinstance(value, bool) and value >= lo

    if not isinstance(name, str) or not name:
        raise ValueError(f"the served model name must be a non-empty string, got {name!r}")
    if not whole(max_batch, 1):
        raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
    if not whole(max_queue, 0):
        raise ValueError(f"max_queue must be an integer >= 0, got {max_queue!r}")
    if max_len is not None and not whole(max_len, 2):
        raise ValueError(f"max_len must be an integer >= 2, got {max_len!r}")
    if kv_cache_tokens is not None and not whole(kv_cache_tokens, 1):
        raise ValueError(f"kv_cache_tokens must be an integer >= 1, got {kv_cache_tokens!r}")
    if not isinstance(drain_timeout, (int, float)) or not drain_timeout >= 0:
        raise ValueError(f"drain_timeout must be a number of seconds >= 0, got {drain_timeout!r}")


def _card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "phi3"}


def _check_model(model: str, name: str) -> None:
    if model != name:  # compared with the served name only: never a path
        raise APIError(404, f"The model `{model[:200]}` does not exist (this server serves `{name}`)", param="model",
                       code="model_not_found")


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _api_error(request: Request, e: APIError) -> JSONResponse:
    return _error(e)


async def _http_error(request: Request, e: HTTPException) -> JSONResponse:  # unknown path, wrong method
    return _error(APIError(e.status_code, f"{e.detail}: {request.method} {request.url.path}",
                           code="not_found" if e.status_code == 404 else None))


async def _client_gone(request: Request, e: ClientDisconnect) -> Response:
    log.info("%s %s: the client disconnected before its request was read", request.method, request.url.path)
    return Response(status_code=499)  # nobody reads it: the connection is closed


async def _internal_error(request: Request, e: Exception) -> JSONResponse:
    log.error("unexpected error in %s %s", request.method, request.url.path, exc_info=e)
    return _error(APIError(500, "internal server error; see the server's log"))


class _APIKey:
    """`Authorization: Bearer KEY` (the scheme in any case) on every path but /health, the key
    compared in constant time."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in PUBLIC_PATHS:
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            scheme, _, token = given.strip().partition(b" ")
            if not (scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.expected)):
                what = "Incorrect API key provided" if given else "Missing API key (send Authorization: Bearer KEY)"
                await _error(APIError(401, what, code="invalid_api_key"))(scope, receive, send)
                return
        await self.app(scope, receive, send)


# -- one completion request ------------------------------------------------------------------------
async def _complete(request: Request, backend: Backend, shape) -> Response:
    backend.check_ready()
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":  # also closes CORS "simple requests" (text/plain) from web pages
        raise APIError(415, f"the body must be JSON sent with 'Content-Type: application/json' (got "
                       f"{media_type[:100] or 'none'!r}; with curl: -H 'Content-Type: application/json')",
                       code="unsupported_media_type")
    req = api.parse(shape.request, await _read_body(request))
    _check_model(req.model, backend.name)
    prompts = await asyncio.to_thread(api.prompts, req, backend.llm.encode_prompt)
    n = req.n or 1
    budgets = [api.completion_budget(req, len(ids), *backend.context) for ids in prompts]
    echoes = None
    if getattr(req, "echo", False):  # /v1/completions: the prompt, and its log-probabilities if asked for
        scored = [None] * len(prompts)  # per prompt: its tokens' scores, where asked for (a first token has none)
        if req.alternatives is not None and (some := [k for k, ids in enumerate(prompts) if len(ids) > 1]):
            got = await backend.score([(prompts[k][:1], prompts[k][1:]) for k in some], req.alternatives)
            for k, s in zip(some, got):
                scored[k] = s
        echoes = [await asyncio.to_thread(api.echo, backend.llm, ids, req.alternatives, s)
                  for ids, s in zip(prompts, scored)]
        if req.max_tokens == 0:
            head = {"id": shape.id_prefix + uuid.uuid4().hex, "created": int(time.time()), "model": backend.name}
            choices = [api.with_echo(shape.choice(k, "", "length", [] if req.alternatives is not None else None),
                                     *echoes[k // n]) for k in range(len(prompts) * n)]
            return JSONResponse({**head, "object": shape.object, "choices": choices,
                                 "usage": api.usage(sum(len(ids) for ids in prompts), 0)})
    work = [(ids, api.sampling_params(req, budget, i, request.app.state.speculate)) for ids, budget in zip(prompts, budgets) for i in range(n)]
    calls = shape is api.Chat and api.calls_expected(req)  # tools: answers are read for tool calls
    job = backend.open(work, bool(req.ignore_eos))
    head = {"id": shape.id_prefix + uuid.uuid4().hex, "created": int(time.time()), "model": backend.name}
    prompt_tokens = sum(len(ids) for ids in prompts)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _EventStream(_sse(job, shape, head, prompt_tokens, include_usage, calls), on_close=job.close)
    try:
        return await _collect(job, shape, head, prompt_tokens, request, echoes, calls)
    finally:
        job.close()


async def _read_body(request: Request) -> bytes:
    """The body, refused with 413 past MAX_BODY bytes (before reading it when Content-Length says so)."""
    too_large = APIError(413, f"the request body is larger than {MAX_BODY} bytes", code="request_too_large")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY:
        raise too_large
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > MAX_BODY:
            raise too_large
    return bytes(body)


async def _collect(job: Job, shape, head: dict, prompt_tokens: int, request: Request, echoes=None,
                   calls: bool = False) -> Response:
    """A non-streamed answer; stops early (cancelling the job) if the client disconnects."""
    texts, finish, completion = [[] for _ in job.requests], [None] * len(job.requests), 0
    tokens = [None if lp is None else [] for lp in job.logprobs]  # log-probabilities, where asked for

    async def gather():
        nonlocal completion
        async for batch in job.chunks():
            for k, chunk, entries in batch:
                texts[k].append(chunk.text)
                if entries is not None:
                    tokens[k] += entries
                if chunk.finish_reason is not None:
                    finish[k], completion = chunk.finish_reason, completion + chunk.usage.completion_tokens

    work, gone = asyncio.ensure_future(gather()), asyncio.ensure_future(_disconnected(request))
    await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    if not work.done():
        work.cancel()
        return Response(status_code=499)  # nobody reads it: the connection is closed
    work.result()  # an APIError from the engine goes to the client
    choose = partial(_with_calls, shape) if calls else shape.choice  # tools: each answer read as text or calls
    choices = [choose(k, "".join(t), f, lp) for k, (t, f, lp) in enumerate(zip(texts, finish, tokens))]
    if echoes is not None:  # one per prompt, its n choices in a row
        n = len(choices) // len(echoes)
        choices = [api.with_echo(c, *echoes[k // n]) for k, c in enumerate(choices)]
    return JSONResponse({**head, "object": shape.object, "choices": choices,
                         "usage": api.usage(prompt_tokens, completion)})


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _with_calls(shape, k: int, text: str, finish_reason: str, tokens) -> dict:
    stream = CallStream()
    content, _ = stream.push(text)
    rest, _, finish_reason = stream.close(finish_reason)
    return shape.choice(k, content + rest, finish_reason, tokens, stream.calls)


async def _sse(job: Job, shape, head: dict, prompt_tokens: int, include_usage: bool,
               calls: bool = False) -> AsyncIterator[bytes]:
    """Server-sent events: one chunk per choice with new text (and its tokens' log-probabilities,
    if asked), the last with its finish_reason; then the usage chunk (if asked) and `data: [DONE]`.
    An error after the 200 header is sent in-band as `data: {"error": …}`, then `[DONE]`."""
    extra = {"usage": None} if include_usage else {}

    def event(body: dict) -> bytes:
        return b"data: " + json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"

    def chunk(choice: dict) -> bytes:
        return event({**head, "object": shape.chunk_object, "choices": [choice], **extra})

    if shape is api.Chat:  # the opening chunk of each choice carries the role
        for k in range(len(job.requests)):
            yield chunk(shape.chunk_choice(k, None, None))
    completion = 0
    streams = [CallStream() for _ in job.requests] if calls else None  # tools: text -> content and call deltas
    try:
        async for batch in job.chunks():
            merged: dict[int, list] = {}  # choice -> [text, finish_reason, tokens]
            for k, c, entries in batch:
                piece = merged.setdefault(k, ["", None, None])
                piece[0] += c.text
                if entries is not None:
                    piece[2] = (piece[2] or []) + entries
                if c.finish_reason is not None:
                    piece[1] = c.finish_reason
                    completion += c.usage.completion_tokens
            for k, (text, finish_reason, tokens) in merged.items():
                deltas = None
                if streams is not None:
                    text, deltas = streams[k].push(text)
                    if finish_reason is not None:
                        rest, more, finish_reason = streams[k].close(finish_reason)
                        text, deltas = text + rest, deltas + more
                    if text or finish_reason or tokens or deltas:
                        yield chunk(shape.chunk_choice(k, text, finish_reason, tokens, deltas))
                    continue
                if text or finish_reason or tokens:
                    yield chunk(shape.chunk_choice(k, text, finish_reason, tokens))
    except APIError as e:
        yield event(e.body())
    except Exception:  # after the 200 header: the error goes in-band, the traceback to the log
        log.exception("unexpected error in a stream")
        yield event(APIError(500, "internal server error; see the server's log").body())
    else:
        if include_usage:
            yield event({**head, "object": shape.chunk_object, "choices": [],
                         "usage": api.usage(prompt_tokens, completion)})
    yield b"data: [DONE]\n\n"


class _EventStream(StreamingResponse):
    """An SSE response that runs `on_close` however it ends (done, client gone, server stopping)."""

    def __init__(self, content, on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


# -- running it ------------------------------------------------------------------------------------
class _Server(uvicorn.Server):
    """uvicorn, plus: SIGTERM/SIGINT start the drain; a failed load or engine ends the process."""

    def __init__(self, config: uvicorn.Config, backend: Backend):
        super().__init__(config)
        self.backend = backend

    def handle_exit(self, sig, frame) -> None:
        if self.backend.loop is not None:
            self.backend.loop.call_soon_threadsafe(self.backend.drain)
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        return self.backend.status == "failed" or await super().on_tick(counter)

    async def startup(self, sockets=None) -> None:
        connections.quiet_accept_errors(asyncio.get_running_loop())
        await super().startup(sockets)


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, opened before the model loads, so that a port in use (or a
    bad host) is one OSError at once, not a failure after the load."""
    sock = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart need not wait
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        if sock is not None:
            sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def serve(model: str | LLM, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 8, max_queue: int = 256, max_len: int | None = None, served_model_name: str | None = None,
          device=None, dtype=None, activations: str = "fp32", drain_timeout: float = 30.0,
          log_level: str = "info", kv_cache_tokens: int | None = None, prefix_cache: bool = True,
          allowed_hosts: list[str] | None = None, allowed_origins: list[str] = (),
          max_connections: int | None = None, header_timeout: float = 10.0, body_timeout: float = 60.0,
          speculate: str | None = None, kv_cache_dtype: str = "auto") -> int:
    """Serve `model` (a name for `phi3.load`, loaded in the background, or an `LLM`) over HTTP
    until SIGTERM or SIGINT; returns the exit code (0; 1 if the engine failed; 2 if loading did).

    On a loopback `host` only loopback Host names are answered, and `allowed_hosts` (elsewhere:
    only those, when given); `allowed_origins`: web pages that may call it (guard.py). Connections:
    at most `max_connections` (default: below the file limit), headers within `header_timeout`
    seconds, a body within `body_timeout` (connections.py). The address is bound before the load."""
    limits = connections.Limits(connections.connection_cap(max_connections), header_timeout, body_timeout)
    if is_loopback(host):
        allowed_hosts = [*LOOPBACK_HOSTS, *(allowed_hosts or [])]
    if isinstance(model, LLM):
        load, name = (lambda: model), served_model_name or model.name or "phi3"
    else:
        from .loader import load as load_model, pick_device, pick_dtype
        from .quantize import check_activations

        pick_dtype(dtype, pick_device(device), None)  # a bad device, dtype or activations fails now, not once serving
        check_activations(activations)
        load = lambda: load_model(model, device=device, dtype=dtype, activations=activations)  # noqa: E731
        name = served_model_name or str(model)
    app = create_app(load, name=name, api_key=api_key, max_batch=max_batch, max_queue=max_queue, max_len=max_len,
                     drain_timeout=drain_timeout, kv_cache_tokens=kv_cache_tokens, prefix_cache=prefix_cache,
                     allowed_hosts=allowed_hosts, allowed_origins=allowed_origins, speculate=speculate,
                     kv_cache_dtype=kv_cache_dtype)
    sock = _listen(host, port)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=connections.protocol(limits),
                            h11_max_incomplete_event_size=connections.MAX_HEADER_BYTES,
                            timeout_graceful_shutdown=drain_timeout + 5)
    server = _Server(config, app.state.backend)
    main = threading.current_thread() is threading.main_thread()
    # uvicorn re-raises SIGTERM once it has shut down gracefully: let that one pass, so the exit is 0
    previous = signal.signal(signal.SIGTERM, lambda *_: None) if main else None
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        if main:
            signal.signal(signal.SIGTERM, previous)
    return app.state.backend.exit_code
