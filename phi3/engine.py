"""The batched engine: one KV cache of fixed slots, a scheduler, and one decode step.

    submit(prompt ids, params) ─► waiting ─► a free slot ─► prefill, in chunks, into the slot ─►
    decoding: every decoding row advances one token per step ─► finished (stop id, length, cancel)

`step()` is one scheduler iteration: admit waiting requests to free slots, prefill up to
`prefill_chunk` prompt tokens (so a long prompt never stalls the decoding rows for more than one
chunk), then one decode step for all decoding rows. It returns the new tokens as `Event`s and
records them on each `Request`. `generate_step` is the token-level generator over one request
(mlx-lm's shape); `LLM.stream`/`generate` and the server read the engine through these.

The decode step has fixed shapes: rows 0..B-1 of the cache (B a power-of-two bucket over the
highest busy slot; requests take the lowest free slot), keys 0..S-1 (S a power-of-two bucket over
the longest row), one token per row. Everything that varies per row (token, position, LongRoPE
set, sampling parameters, seed) is a device tensor indexed by slot, so the step is a pure function
of (B, S, sampling mode): compiled with `torch.compile` if asked, and on CUDA captured once per
shape in a CUDA graph and replayed; the only host sync per step reads the new ids.

LongRoPE per row: a slot's keys carry the factor set they were rotated with. When a row that was
prefilled with the short factors reaches `original_max_position_embeddings + 1` tokens, its whole
sequence is prefilled again into its slot with the long factors (as transformers does for one
sequence), while the other rows go on decoding.
"""

from __future__ import annotations

import itertools
import sys
import threading
from collections import deque
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field

import torch

from .cache import KVCache
from .grammar import Matcher, matcher_for
from .model import Phi3
from .sampling import MAX_LOGPROBS, Mode, RowParams, SamplingParams, logprobs_of, random_seed

PREFILL_CHUNK = 2048  # prompt tokens per prefill forward: bounds activation memory
MIN_KV_BUCKET = 64


@dataclass(eq=False)
class Request:
    """One sequence in the engine. `tokens` grows as it decodes; `finish_reason` is set at the end
    ("stop": a stop id, not included in `tokens`; "length": max_new_tokens or the context;
    "cancelled")."""

    prompt: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    max_new: int
    seed: int
    id: int
    tokens: list[int] = field(default_factory=list)
    # with params.logprobs: per token, its log-probability and the most likely (id, log-probability)s
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    finish_reason: str | None = None
    slot: int | None = None
    cancelled: bool = False
    # prefill progress: the ids being written into the slot, and how many are written
    _todo: list[int] = field(default_factory=list, repr=False)
    _written: int = 0
    _long: bool = False  # the LongRoPE set of the keys in its slot (host copy of cache.long_rope)
    matcher: Matcher | None = field(default=None, repr=False)  # structured output: its grammar state

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def length(self) -> int:
        """Tokens in the sequence so far (prompt and generated)."""
        return len(self.prompt) + len(self.tokens)


@dataclass
class Event:
    """A new token of `request` (None when it ended without one) and, on its last event, why it ended."""

    request: Request
    token: int | None
    finish_reason: str | None = None
    logprob: tuple[float, list[tuple[int, float]]] | None = None  # with params.logprobs, as Request.logprobs


class Engine:
    """Slots in one KV cache and the scheduler over them. Build one per model and size; see the
    module docstring. `submit` and `cancel` may be called from other threads; `step` from one."""

    def __init__(self, model: Phi3, *, slots: int = 1, max_len: int | None = None,
                 prefill_chunk: int = PREFILL_CHUNK, cuda_graphs: bool | None = None, compile: bool = False,
                 tokenizer=None):
        config = model.config
        param = next(model.parameters())
        self.model, self.device, self.dtype = model, param.device, param.dtype
        max_len = config.max_position_embeddings if max_len is None else max_len
        if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be a positive integer, got {prefill_chunk!r}")
        check_memory(model, slots, max_len, self.device, self.dtype)
        self.cache = KVCache(config, slots, max_len, self.dtype, self.device)
        self.slots, self.max_len, self.prefill_chunk = slots, max_len, prefill_chunk
        self.tokenizer = tokenizer  # structured output: the grammars' vocabulary
        model.rope.tables(max_len + 1, self.dtype)  # built now, never inside a captured step
        # Per-slot decode state on the device (inactive slots sit at the scratch position).
        self.params = RowParams(slots, config.vocab_size, self.device)
        self.tokens_in = torch.zeros(slots, dtype=torch.long, device=self.device)  # next id to feed
        self.positions = torch.full((slots,), max_len, dtype=torch.long, device=self.device)  # its position
        self.active = torch.zeros(slots, dtype=torch.bool, device=self.device)  # decoding this step
        self.next_ids = torch.zeros(slots, dtype=torch.long, device=self.device)
        k = min(MAX_LOGPROBS, config.vocab_size)  # with logprobs: the drawn ids' and the top k's
        self.logprob = torch.zeros(slots, device=self.device)
        self.top_logprob = torch.zeros(slots, k, device=self.device)
        self.top_ids = torch.zeros(slots, k, dtype=torch.long, device=self.device)
        # Host-side scheduling state.
        self.requests: dict[int, Request] = {}  # slot -> request
        self._free = list(range(slots))  # kept sorted: the lowest free slot is taken first
        self._waiting: deque[Request] = deque()
        self._prefilling: deque[Request] = deque()
        self._decoding: set[int] = set()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        # The step: eager, compiled, and/or captured per (B, S, mode).
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs needs the model on a CUDA device")
        if compile:  # one specialisation per (B, S, mode) bucket: allow as many as there are buckets
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
        self._body = torch.compile(self._decode_body, dynamic=False) if compile else self._decode_body
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._pool = None

    # -- requests ----------------------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, stop_ids=frozenset()) -> Request:
        """Queue a request (token ids already checked against the vocabulary); returns its handle."""
        n = len(prompt_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if n >= self.max_len:
            raise ValueError(f"the prompt has {n} tokens; the context is {self.max_len}"
                             f"{' (the engine was sized below the model)' if self.max_len < self.model.config.max_position_embeddings else ''}")
        req = Request(list(prompt_ids), params, frozenset(stop_ids), min(params.max_new_tokens, self.max_len - n),
                      random_seed() if params.seed is None else params.seed, next(self._ids))
        req.matcher = matcher_for(params, self.tokenizer, self.model.config.vocab_size, req.stop_ids)  # grammar
        with self._lock:
            self._waiting.append(req)
        return req

    def cancel(self, request: Request) -> None:
        """Stop `request` at the next step (its slot is freed then); safe from any thread."""
        request.cancelled = True

    @property
    def busy(self) -> bool:
        """Whether any request is waiting, prefilling or decoding."""
        return bool(self._waiting or self.requests)

    def generate_step(self, prompt_ids: Sequence[int], params: SamplingParams,
                      stop_ids=frozenset()) -> Generator[int, None, str]:
        """Yield the new ids of one request as they come; return its finish reason. Closing the
        generator early cancels the request. Other requests in the engine advance meanwhile."""
        req = self.submit(prompt_ids, params, stop_ids)
        seen = 0
        try:
            while not req.finished:
                self.step()
                while seen < len(req.tokens):
                    seen += 1
                    yield req.tokens[seen - 1]
            while seen < len(req.tokens):
                seen += 1
                yield req.tokens[seen - 1]
            return req.finish_reason
        finally:
            if not req.finished:
                self.cancel(req)
                self._retire_cancelled()

    # -- scheduling --------------------------------------------------------------------------------
    def step(self) -> list[Event]:
        """One iteration: admit, prefill up to `prefill_chunk` tokens, decode one token per row."""
        events = self._retire_cancelled()
        self._admit()
        budget = self.prefill_chunk
        while budget > 0 and self._prefilling:
            req = self._prefilling[0]
            n = min(budget, len(req._todo) - req._written)
            logits = self._prefill(req, n)
            budget -= n
            if req._written == len(req._todo):
                self._prefilling.popleft()
                mode, slot = self.params.mode([req.slot]), req.slot
                if req.matcher is not None:  # grammar: this row's allowed first tokens
                    self.params.fill_masks({slot: req.matcher})
                token = self.params.sample(logits, slot, mode)
                self.params.advance(slot, token, torch.ones_like(token, dtype=torch.bool))
                if mode.logprobs:
                    self._store_logprobs(slot, logits, token)
                events += self._accept(req, int(token[0]), self._logprob(req, slot) if mode.logprobs else None,
                                       from_prefill=True)
        if self._decoding:
            events += self._decode()
        return events

    def _retire_cancelled(self) -> list[Event]:
        events = []
        with self._lock:
            for req in [r for r in self._waiting if r.cancelled]:
                self._waiting.remove(req)
                req.finish_reason = "cancelled"
                events.append(Event(req, None, "cancelled"))
        for req in [r for r in self.requests.values() if r.cancelled]:
            if req in self._prefilling:
                self._prefilling.remove(req)
            self._finish(req, "cancelled")
            events.append(Event(req, None, "cancelled"))
        return events

    def _admit(self) -> None:
        with self._lock:
            while self._waiting and self._free:
                req = self._waiting.popleft()
                req.slot = self._free.pop(0)
                self.requests[req.slot] = req
                self.params.set(req.slot, req.params, req.seed, req.prompt)
                self._start_prefill(req, req.prompt)

    def _start_prefill(self, req: Request, ids: list[int]) -> None:
        """(Re)write `ids` into the request's slot, with the factor set their length calls for."""
        req._todo, req._written = ids, 0
        req._long = self.model.uses_long_rope(len(ids))
        self.cache.long_rope[req.slot] = req._long
        self._prefilling.append(req)

    @torch.inference_mode()
    def _prefill(self, req: Request, n: int) -> torch.Tensor:
        """Write the request's next `n` ids into its slot (attending over its written prefix
        only); logits (1, V) of the last one."""
        start = req._written
        tokens = torch.tensor([req._todo[start:start + n]], dtype=torch.long, device=self.device)
        positions = torch.arange(start, start + n, device=self.device)[None]
        logits = self.model(tokens, positions, self.cache, slot=req.slot, kv_len=start + n, last_only=True)
        req._written += n
        return logits[:, -1]

    def _accept(self, req: Request, token: int, logprob=None, from_prefill: bool = False) -> list[Event]:
        """Host-side bookkeeping for a token drawn for `req` (with its logprobs, if asked for)."""
        if token in req.stop_ids:
            self._finish(req, "stop")
            return [Event(req, None, "stop")]
        req.tokens.append(token)
        if logprob is not None:
            req.logprobs.append(logprob)
        if req.matcher is not None and req.matcher.advance(token):  # grammar: the answer is complete
            self._finish(req, "stop")
            return [Event(req, token, "stop", logprob)]
        if len(req.tokens) >= req.max_new:
            self._finish(req, "length")
            return [Event(req, token, "length", logprob)]
        slot = req.slot
        if self.model.uses_long_rope(req.length) and not req._long:
            self._set_idle(slot)  # the LongRoPE crossing: this row alone is prefilled again
            self._start_prefill(req, req.prompt + req.tokens)
        elif from_prefill:
            self.tokens_in[slot], self.positions[slot], self.active[slot] = token, req.length - 1, True
            self._decoding.add(slot)
        return [Event(req, token, None, logprob)]

    def _store_logprobs(self, first: int, logits: torch.Tensor, ids: torch.Tensor) -> None:
        end = first + ids.shape[0]
        self.logprob[first:end], self.top_logprob[first:end], self.top_ids[first:end] = \
            logprobs_of(logits, ids, self.top_ids.shape[1])

    def _logprob(self, req: Request, slot: int) -> tuple[float, list[tuple[int, float]]] | None:
        """The stored logprobs of `slot` as Python numbers, if its request asked for them."""
        k = req.params.logprobs
        if k is None:
            return None
        return float(self.logprob[slot]), list(zip(self.top_ids[slot, :k].tolist(), self.top_logprob[slot, :k].tolist()))

    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        self._set_idle(req.slot)
        del self.requests[req.slot]
        self._free.append(req.slot)
        self._free.sort()
        kernels = sys.modules.get("phi3.kernels")  # loaded only where a CPU decode step offered its layers to C
        if not self.requests and kernels is not None:
            kernels.forget(self.model)  # idle: let go of what the C layers read (weights may change before the next request)

    def _set_idle(self, slot: int) -> None:
        if slot in self._decoding:
            self._decoding.discard(slot)
            self.active[slot], self.positions[slot] = False, self.cache.scratch

    # -- the decode step ---------------------------------------------------------------------------
    def _decode(self) -> list[Event]:
        rows = sorted(self._decoding)
        batch = min(self.slots, 1 << rows[-1].bit_length())  # power of two > the highest busy slot
        longest = max(self.requests[r].length for r in rows)
        kv_len = min(self.max_len, max(MIN_KV_BUCKET, 1 << (longest - 1).bit_length()))
        mode = self.params.mode(rows)
        if mode.grammar:  # grammar: the constrained rows' allowed tokens, before the step
            self.params.fill_masks({r: self.requests[r].matcher for r in rows if self.requests[r].matcher})
        self._run(batch, kv_len, mode)
        ids = self.next_ids[:batch].tolist()  # the one host sync of the step
        events = []
        for r in rows:
            req = self.requests[r]
            events += self._accept(req, ids[r], self._logprob(req, r) if mode.logprobs else None)
        return events

    def _run(self, batch: int, kv_len: int, mode: Mode) -> None:
        if not self.cuda_graphs:
            with torch.inference_mode():
                self._body(batch, kv_len, mode)
            return
        key = (batch, kv_len, mode)
        if key not in self._graphs:
            self._graphs[key] = self._capture(batch, kv_len, mode)
        self._graphs[key].replay()

    def _decode_body(self, batch: int, kv_len: int, mode: Mode) -> None:
        """Rows 0..batch-1 feed their next id and draw the one after (fixed shapes; in place)."""
        active = self.active[:batch]
        logits = self.model(self.tokens_in[:batch, None], self.positions[:batch, None], self.cache,
                            kv_len=kv_len)[:, -1]  # (B, V)
        ids = self.params.sample(logits, 0, mode)  # (B,)
        if mode.logprobs:
            self._store_logprobs(0, logits, ids)
        self.params.advance(0, ids, active)
        self.next_ids[:batch] = ids
        self.tokens_in[:batch] = torch.where(active, ids, self.tokens_in[:batch])
        self.positions[:batch] += active

    def _capture(self, batch: int, kv_len: int, mode: Mode) -> "torch.cuda.CUDAGraph":
        """Record the step for this shape. The warm-up run changes no state: every row is marked
        inactive for it (a busy row rewrites the same keys at its own position, which the real
        step writes again)."""
        saved = self.active.clone()
        self.active.zero_()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            self._body(batch, kv_len, mode)
        torch.cuda.current_stream().wait_stream(stream)
        self._pool = self._pool or torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool), torch.inference_mode():
            self._body(batch, kv_len, mode)
        self.active.copy_(saved)
        return graph


def check_memory(model: Phi3, slots: int, max_len: int, device: torch.device, dtype: torch.dtype) -> None:
    """A clear error, before allocating, when a cache of this size cannot fit."""
    config = model.config
    if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
        raise ValueError(f"slots must be a positive integer, got {slots!r}")
    if not isinstance(max_len, int) or isinstance(max_len, bool) or not 2 <= max_len <= config.max_position_embeddings:
        raise ValueError(f"max_len must be an integer in [2, {config.max_position_embeddings}] (the model's "
                         f"context), got {max_len!r}")
    need = KVCache.nbytes(config, slots, max_len, dtype) + slots * (config.vocab_size + 1)
    free = free_memory(device)
    if free is not None and need > 0.9 * free:
        gib = 2**30
        raise ValueError(f"a KV cache of {slots} slot(s) x {max_len} positions needs {need / gib:.2f} GiB and "
                         f"{device} has {free / gib:.2f} GiB free: ask for fewer slots or a shorter max_len")


def free_memory(device: torch.device) -> int | None:
    """Bytes free on `device` (CUDA: the driver's count; CPU: the kernel's MemAvailable), or None."""
    if device.type == "cuda":  # what the driver has free, and what torch's allocator holds unused
        return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
