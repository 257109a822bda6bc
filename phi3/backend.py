"""The server's backend: the engine on its own thread, and the hand-off of its events to asyncio.

    handler (event loop) ─► Backend.open: admit (429 past the queue bound) ─► Engine.submit ─► Job
        (echo's log-probabilities: Backend.score ─► Engine.submit_reads, phi3.scoring)
    engine thread: while the engine is busy: Engine.step() ─► events ─► loop.call_soon_threadsafe(deliver)
    event loop: deliver ─► each Job's queue ─► Job.chunks(): TextStream (and AnswerLogprobs, if
        asked) per choice ─► the handler

Only the engine thread calls `Engine.step`; everything else (jobs, counters, status) lives on the
event loop's thread, so it needs no locks. The HTTP layer never decodes: it reads `Job.chunks()`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable

from . import machine
from .cache import KVCache
from .engine import Engine, Event
from .generate import LLM, Chunk, TextStream
from .logprobs import AnswerLogprobs, TokenLogprob, TokenTexts
from .openai_api import APIError
from .sampling import SamplingParams

log = logging.getLogger("uvicorn.error")  # uvicorn's configured logger: our lines appear with its own

_FAILED = object()  # put in each job's queue when the engine dies


class Backend:
    """The model, its engine and the engine thread; admission, dispatch of engine events to jobs,
    and the server's status: loading, ok, draining or failed."""

    def __init__(self, load: Callable[[], LLM], *, name: str, max_batch: int, max_queue: int, max_len: int | None,
                 drain_timeout: float, kv_cache_tokens: int | None = None, prefix_cache: bool = True,
                 speculate=None, kv_cache_dtype: str = "auto"):
        self._load, self.name = load, name
        self.speculate = speculate  # every request's speculative decoding (a phi3.speculate.Speculation, or None)
        self.kv_cache_tokens, self.prefix_cache, self.kv_cache_dtype = kv_cache_tokens, prefix_cache, kv_cache_dtype
        self.slots, self.max_queue, self.max_len, self.drain_timeout = max_batch, max_queue, max_len, drain_timeout
        self.status, self.exit_code = "loading", 0
        self.llm: LLM | None = None
        self.warnings: list[str] = []  # what this machine lacks that costs speed (phi3.machine)
        self.token_texts: TokenTexts | None = None  # how log-probabilities show tokens, shared by all requests
        self.engine: Engine | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.jobs: dict[int, Job] = {}  # engine request id -> its job (loop thread only)
        self.pending = 0  # engine requests submitted and not yet finished (loop thread only)
        self.finished: Counter[str] = Counter()  # engine requests by finish reason
        self._wake, self._stop = threading.Event(), False
        self._thread: threading.Thread | None = None

    # -- the engine thread -------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._thread = threading.Thread(target=self._load_and_run, name="phi3-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _load_and_run(self) -> None:
        try:
            llm = self._load()
            if llm.tokenizer is None:
                raise ValueError("the server needs a tokenizer, and this model has none")
            max_len = self.max_len or llm.config.max_position_embeddings
            self.engine = Engine(llm.model, slots=self.slots, max_len=max_len, kv_cache_tokens=self.kv_cache_tokens,
                                 prefix_cache=self.prefix_cache, tokenizer=llm.tokenizer,
                                 kv_cache_dtype=self.kv_cache_dtype)
            self.engine.load_draft = llm.load_draft
            if self.speculate is not None and self.speculate.kind == "model":  # loaded and checked before serving
                runner = self.engine.draft_runner(self.speculate)
                log.info("speculative decoding with %s: %d tokens a step", runner.name, self.speculate.k)
        except Exception as e:
            log.error("phi3: error: %s", e, exc_info=not isinstance(e, (ValueError, OSError, RuntimeError)))
            self._post(self._set_failed, 2)
            return
        self.llm, self.max_len, self.token_texts = llm, max_len, TokenTexts(llm.tokenizer)
        self.warnings = machine.warnings(llm.device)  # shown by /health
        for line in self.warnings:
            log.warning("phi3: warning: %s", line)
        cache = self.engine.cache
        log.info("serving %s as %r: %d rows, context %d, KV cache %d tokens (%s, %.2f GiB, touched as used; "
                 "prefix cache %s), queue %d", llm.name, self.name, self.slots, max_len, cache.tokens, cache.stored,
                 KVCache.nbytes(llm.config, cache.tokens, llm.dtype, cache.kv_dtype) / 2**30,
                 "on" if self.prefix_cache else "off", self.max_queue)
        self._post(self._ready)
        self._run()

    def _run(self) -> None:
        engine = self.engine
        while not self._stop:
            if not engine.busy:
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                events = engine.step()
            except Exception:
                log.exception("the engine failed")
                self._post(self._set_failed, 1)
                return
            if events and not self._post(self._deliver, events):
                return

    def _post(self, fn, *args) -> bool:
        """Run `fn(*args)` on the event loop; False once the loop is closed (the server has stopped)."""
        try:
            self.loop.call_soon_threadsafe(fn, *args)
            return True
        except RuntimeError:
            return False

    # -- on the event loop -------------------------------------------------------------------------
    def _deliver(self, events: list[Event]) -> None:
        for event in events:
            job = self.jobs.get(event.request.id)
            if job is not None:
                job.queue.put_nowait(event)
            if event.finish_reason is not None:
                self.jobs.pop(event.request.id, None)
                self.pending -= 1
                self.finished[event.finish_reason] += 1

    def _ready(self) -> None:
        if self.status == "loading":  # not if a SIGTERM came first
            self.status = "ok"

    def _set_failed(self, exit_code: int) -> None:
        self.status, self.exit_code = "failed", exit_code
        for job in set(self.jobs.values()):
            job.queue.put_nowait(_FAILED)

    @property
    def context(self) -> tuple[int, str]:
        """The longest sequence a request may reach, and what sets it (the model's context or the KV pool)."""
        engine = self.engine
        if engine.cache.tokens < engine.max_len:
            return engine.context, "This server's KV cache (--kv-cache-tokens)"
        return engine.context, "This model's maximum context length"

    def check_ready(self) -> None:
        if self.status != "ok":
            message = {"loading": "the model is still loading", "draining": "the server is shutting down"}
            raise APIError(503, message.get(self.status, "the server failed; see its log"),
                           code="unavailable")

    def _check_room(self, n: int) -> None:
        """A 400 when `n` engine requests exceed what the server ever holds, a 429 when the queue has no room now."""
        self.check_ready()
        if n > self.slots + self.max_queue:
            raise APIError(400, f"this request needs {n} sequences (prompts x n); the server holds at most "
                           f"{self.slots + self.max_queue} at once", param="n")
        if self.pending + n > self.slots + self.max_queue:
            raise APIError(429, f"the server is busy ({max(0, self.pending - self.slots)} requests waiting, "
                           f"{self.max_queue} at most); retry shortly", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"})

    def open(self, work: list[tuple[list[int], SamplingParams]], ignore_eos: bool) -> Job:
        """Submit a request's (prompt ids, params) rows, all or none: a 429 when the queue is full."""
        self._check_room(len(work))
        stop_ids = frozenset() if ignore_eos else self.llm.stop_ids
        job = Job(self, [self.engine.submit(ids, params, stop_ids) for ids, params in work],
                  [TextStream(self.llm.tokenizer, params.stop, len(ids)) for ids, params in work],
                  [None if params.logprobs is None else AnswerLogprobs(self.token_texts) for _, params in work])
        self.pending += len(work)
        for req in job.requests:
            self.jobs[req.id] = job  # before any event can be delivered: delivery runs on this thread
        self._wake.set()
        return job

    async def score(self, pairs: list[tuple[list[int], list[int]]], top: int) -> list:
        """`phi3.scoring.score` on the engine thread: one scoring request per distinct input, in the
        engine's queue beside the generation requests (the same bounds) and over its prefix cache;
        the output layer runs here, off the event loop."""
        from .scoring import Scoring

        work = Scoring(self.llm, pairs, top)
        self._check_room(len(work.inputs))
        while requests := work.submit(self.engine):  # the shared prefixes, then the inputs
            job = ScoreJob(requests)
            self.pending += len(job.requests)
            for req in job.requests:
                self.jobs[req.id] = job
            self._wake.set()
            try:
                await job.wait()
            finally:
                self.cancel(job.requests)  # a no-op for the ended ones
                for req in job.requests:
                    self.jobs.pop(req.id, None)
        return await asyncio.to_thread(work.results)

    def cancel(self, requests) -> None:
        for req in requests:
            self.engine.cancel(req)
        self._wake.set()

    def drain(self) -> None:
        """SIGTERM: refuse new requests; after `drain_timeout`, end the ones still running."""
        if self.status in ("loading", "ok"):
            self.status = "draining"
            self.loop.call_later(self.drain_timeout, self._abort_all)

    def _abort_all(self) -> None:
        for job in set(self.jobs.values()):
            self.cancel(job.requests)  # their handlers see "cancelled" and end with an error


class ScoreJob:
    """One request's scoring requests (an echo's prompts) and their event queue."""

    def __init__(self, requests: list):
        self.requests, self.queue = requests, asyncio.Queue()

    async def wait(self) -> None:
        """Until every request has ended; APIError if the engine fails or the server ends them."""
        left = len(self.requests)
        while left:
            event = await self.queue.get()
            if event is _FAILED:
                raise APIError(500, "the engine failed; see the server's log", code="engine_failed")
            if event.finish_reason == "cancelled":
                raise APIError(503, "the server is shutting down", code="unavailable")
            left -= event.finish_reason is not None


class Job:
    """One HTTP request's engine requests (prompts × n choices), their event queue, text streams and
    (where asked for) log-probabilities."""

    def __init__(self, backend: Backend, requests: list, texts: list[TextStream],
                 logprobs: list[AnswerLogprobs | None]):
        self.backend, self.requests, self.texts, self.logprobs = backend, requests, texts, logprobs
        self.index = {req.id: k for k, req in enumerate(requests)}
        self.queue: asyncio.Queue = asyncio.Queue()

    async def chunks(self) -> AsyncIterator[list[tuple[int, Chunk, list[TokenLogprob] | None]]]:
        """(choice, chunk, its tokens' log-probabilities or None) as tokens arrive, a batch per
        wake-up, until every choice has its last chunk. Raises APIError if the engine fails or the
        server ends the request."""
        while not all(t.done for t in self.texts):
            events = [await self.queue.get()]
            while not self.queue.empty():  # the loop fell behind: take what is there in one go
                events.append(self.queue.get_nowait())
            out = []
            for event in events:
                if event is _FAILED:
                    raise APIError(500, "the engine failed; see the server's log", code="engine_failed")
                k = self.index[event.request.id]
                text, logprobs = self.texts[k], self.logprobs[k]
                if text.done:
                    continue
                if event.token is not None:
                    if logprobs is not None:
                        logprobs.push(event.token, event.logprob)
                    if (chunk := text.push(event.token)) is not None:
                        out.append((k, chunk, None if logprobs is None else logprobs.entries(chunk)))
                        if chunk.finish_reason is not None:  # a stop string: the engine need not go on
                            self.backend.cancel([self.requests[k]])
                if event.finish_reason is not None and not text.done:
                    if event.finish_reason == "cancelled":
                        raise APIError(503, "the server is shutting down", code="unavailable")
                    chunk = text.close(event.finish_reason)
                    out.append((k, chunk, None if logprobs is None else logprobs.entries(chunk)))
            if out:
                yield out

    def close(self) -> None:
        """The client has its answer or is gone: cancel what still runs (a no-op for finished requests)."""
        self.backend.cancel(self.requests)
        for req in self.requests:
            self.backend.jobs.pop(req.id, None)
