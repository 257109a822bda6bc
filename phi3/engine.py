"""The batched engine: rows over one paged KV cache, a scheduler, and one decode step.

    submit(prompt ids, params) ─► waiting ─► a free row and the prompt's blocks (a cached prefix
    taken as it is) ─► prefill the rest, in chunks ─► decoding: every decoding row advances one
    token per step, taking a new block every `block_size` tokens ─► finished (stop id, length, cancel)
                     ▲                                                   │ the pool runs out
                     └──── preempted: back to the head of the queue ◄───┘ (the newest row first)

`step()` is one scheduler iteration: admit waiting requests (first come, first served) while a row
and their blocks are free, prefill up to `prefill_chunk` prompt tokens (so a long prompt never
stalls the decoding rows for more than one chunk), then one decode step for all decoding rows. It
returns the new tokens as `Event`s and records them on each `Request`. `generate_step` is the
token-level generator over one request (mlx-lm's shape); `LLM.stream`/`generate` and the server
read the engine through these.

Memory is blocks (cache.py, blocks.py): a sequence holds the blocks its tokens fill, so one long
request and many short ones share the pool. When a decoding row needs a block and none is left,
the newest row is preempted: its blocks are released (its full ones stay in the prefix cache) and
it waits at the head of the queue to be prefilled again with everything it has so far; it then
draws the same tokens (greedy; a seeded row's draws are a function of its seed and step, both
restored). Automatic prefix caching: a request's prompt takes the longest chain of cached full
blocks it starts with, keyed by its tokens and LongRoPE factor set; only the rest is prefilled.

The decode step has fixed shapes: rows 0..B-1 (B a power-of-two bucket over the highest busy row;
requests take the lowest free row), keys 0..S-1 (S a power-of-two bucket over the longest row), one
token per row. Everything that varies per row (token, position, block table, LongRoPE set, sampling
parameters, seed) is a device tensor indexed by row, so the step is a pure function of (B, S,
sampling mode): compiled with `torch.compile` if asked, and on CUDA captured once per shape in a
CUDA graph and replayed; the only host sync per step reads the new ids.

Scoring requests (`submit_reads`, `phi3.scoring`): admitted and prefilled as the others, over the
same pool and prefix cache, but they keep the final hidden states at the positions they read and
end ("scored") when their prefill does, with no token drawn; the prefix cache serves them only up to
the block holding their first read position. Those at the head of the queue are prefilled together
in one right-padded forward, except that one which shares a block with the one before it that is
not written yet waits a forward (also to be admitted) and takes the block from the cache.

LongRoPE per row: a row's keys carry the factor set they were rotated with. When a row that was
prefilled with the short factors reaches `original_max_position_embeddings + 1` tokens, its whole
sequence is prefilled again with the long factors (as transformers does for one sequence), into
blocks keyed by the long set, while the other rows go on decoding.
"""

from __future__ import annotations

import itertools
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field

import torch

from .blocks import BlockManager, OutOfBlocks
from .cache import BLOCK_SIZE, KVCache, kv_dtype_of
from .grammar import Matcher, matcher_for
from .model import Phi3
from .sampling import MAX_LOGPROBS, Mode, RowParams, SamplingParams, logprobs_of, random_seed
from .speculate import (MAX_DRAFT, DraftRunner, Drafter, ModelDrafter, check_vocabulary, draft_pays, layer_slice,
                        moving_average, parse as parse_speculation, probe_pause)

PREFILL_CHUNK = 2048  # prompt tokens per prefill forward: bounds activation memory
MIN_KV_BUCKET = 64


def kv_bucket(length: int, limit: int) -> int:
    """Keys a step reads for a row of `length` tokens: the next power of two (64 at least, `limit`
    at most), so that the step's shapes, hence its compilations and CUDA graphs, stay few."""
    return min(limit, max(MIN_KV_BUCKET, 1 << (length - 1).bit_length()))


def kv_parts(lengths: Sequence[int], limit: int) -> tuple[list[int], tuple[tuple[int, int], ...]]:
    """How a step's rows read their keys: `lengths[i]` keys for row i (0: a spare row). One part,
    every row over the longest row's bucket, unless splitting the rows (by length) into the shorter
    ones and the 1, 2, 4, ... longest saves a quarter of the keys gathered and attended over or more
    (a second part costs a gather and an attention call per layer): then two parts. Returns the
    rows in part order and each part's (rows, keys)."""
    B = len(lengths)
    order = sorted(range(B), key=lengths.__getitem__)
    longest = kv_bucket(max(max(lengths), 1), limit)
    best, parts = B * longest * 3 // 4, ((B, longest),)
    n = 1
    while n < B:
        short = kv_bucket(max(lengths[order[B - n - 1]], 1), limit)
        if (B - n) * short + n * longest <= best:
            best, parts = (B - n) * short + n * longest, ((B - n, short), (n, longest))
        n *= 2
    return order, parts


@dataclass(eq=False)
class Request:
    """One sequence in the engine. `tokens` grows as it decodes; `finish_reason` is set at the end
    ("stop": a stop id, not included in `tokens`; "length": max_new_tokens or the context;
    "cancelled"; "scored": a scoring request's prefill is done). `cached_tokens`: prompt tokens
    whose keys came from the prefix cache."""

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
    slot: int | None = None  # its row, while it holds one
    cancelled: bool = False
    cached_tokens: int = 0
    preemptions: int = 0
    drafted: int = 0  # speculative decoding: tokens guessed for it, and of them accepted
    accepted: int = 0
    # while it holds a row: the ids whose keys go into its blocks, how many are written, its blocks,
    # and the LongRoPE set of its keys (host copy of cache.long_rope)
    _todo: list[int] = field(default_factory=list, repr=False)
    _written: int = 0
    _blocks: list[int] = field(default_factory=list, repr=False)
    _long: bool = False
    _admitted: int = -1  # admission order: the newest row is preempted first
    _started: bool = False  # its prefill has begun (see Engine._rematch)
    matcher: Matcher | None = field(default=None, repr=False)  # structured output: its grammar state
    # a scoring request (Engine.submit_reads): the positions it reads, and once it has ended
    # ("scored") their final hidden states (len(reads), C); _hidden: those of the chunks so far
    reads: list[int] | None = None
    hidden: torch.Tensor | None = field(default=None, repr=False)
    _hidden: list[torch.Tensor] = field(default_factory=list, repr=False)
    drafter: Drafter | ModelDrafter | None = field(default=None, repr=False)  # speculative decoding: its guesses

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
    """Rows over one paged KV cache and the scheduler over them. Build one per model; see the module
    docstring. `slots`: rows decoded together (a bound on the batch, not on memory); `max_len`: the
    longest sequence (default: the model's context); `kv_cache_tokens`: positions in the pool
    (default: `slots * max_len`, capped by free memory); `prefix_cache`: reuse cached prompt
    prefixes. `submit` and `cancel` may be called from other threads; `step` from one."""

    def __init__(self, model: Phi3, *, slots: int = 1, max_len: int | None = None, kv_cache_tokens: int | None = None,
                 block_size: int = BLOCK_SIZE, prefix_cache: bool = True, prefill_chunk: int = PREFILL_CHUNK,
                 cuda_graphs: bool | None = None, compile: bool = False, tokenizer=None, kv_cache_dtype: str = "auto"):
        config = model.config
        param = next(model.parameters())
        self.model, self.device, self.dtype = model, param.device, param.dtype
        max_len = config.max_position_embeddings if max_len is None else max_len
        if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be a positive integer, got {prefill_chunk!r}")
        self.kv_cache_dtype, kv_dtype = kv_cache_dtype, kv_dtype_of(kv_cache_dtype)
        kv_cache_tokens = check_memory(model, slots, max_len, self.device, self.dtype, kv_cache_tokens, block_size,
                                       kv_dtype)
        self.cache = KVCache(config, slots, max_len, self.dtype, self.device, tokens=kv_cache_tokens,
                             block_size=block_size, kv_dtype=kv_dtype)
        self.blocks = BlockManager(self.cache.blocks, block_size, prefix_cache)
        self.slots, self.max_len, self.prefill_chunk = slots, max_len, prefill_chunk
        self.tokenizer = tokenizer  # structured output: the grammars' vocabulary
        # The engine's own RoPE tables, built now for every position a row can reach: never rebuilt
        # (a captured step keeps their addresses), whatever other forwards of the model ask for.
        self.cache.cos, self.cache.sin = model.rope.build(self.cache.scratch + 1, self.dtype)
        # Per-row decode state on the device (inactive rows sit at the scratch position).
        self.params = RowParams(slots, config.vocab_size, self.device)
        self.tokens_in = torch.zeros(slots, dtype=torch.long, device=self.device)  # next id to feed
        self.positions = torch.full((slots,), self.cache.scratch, dtype=torch.long, device=self.device)
        self.active = torch.zeros(slots, dtype=torch.bool, device=self.device)  # decoding this step
        self.next_ids = torch.zeros(slots, dtype=torch.long, device=self.device)
        k = min(MAX_LOGPROBS, config.vocab_size)  # with logprobs: the drawn ids' and the top k's
        self.logprob = torch.zeros(slots, device=self.device)
        self.top_logprob = torch.zeros(slots, k, device=self.device)
        self.top_ids = torch.zeros(slots, k, dtype=torch.long, device=self.device)
        # Host-side scheduling state.
        self.requests: dict[int, Request] = {}  # row -> request
        self._free = list(range(slots))  # kept sorted: the lowest free row is taken first
        self._waiting: deque[Request] = deque()
        self._prefilling: deque[Request] = deque()
        self._decoding: set[int] = set()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._admissions = itertools.count()
        self._weights: list = []  # weak references and versions of the weights the cached keys came from
        # counters for /metrics and bench: prompt tokens admitted, of them taken from the prefix cache,
        # tokens prefilled (resumes and LongRoPE re-prefills included), rows preempted
        self.prompt_tokens = self.hit_tokens = self.computed_tokens = self.preempted = 0
        self.draft_tokens = self.accepted_tokens = 0  # speculative decoding: tokens guessed, of them accepted
        self._runners: dict = {}  # draft models' engines (speculate.DraftRunner), by the draft
        self.load_draft = None  # name -> LLM: how a draft model named by a string is loaded (LLM.load_draft)
        self._step_seconds = self._verify_seconds = None  # plain and verify decode steps' wall times (moving averages)
        # A verify step's inputs (speculative decoding): N positions, each of a row (several may be one
        # row's), its token and position, how many draws after its row's next it is, the row's guesses
        # before it (penalty), and its draw and logprobs. Static, so a captured step reads them.
        n = slots * (MAX_DRAFT + 1)
        self.v_tokens = torch.zeros(n, dtype=torch.long, device=self.device)
        self.v_positions = torch.zeros(n, dtype=torch.long, device=self.device)
        self.v_rows = torch.zeros(n, dtype=torch.long, device=self.device)
        self.v_ahead = torch.zeros(n, dtype=torch.long, device=self.device)
        self.v_guessed = torch.zeros(n, MAX_DRAFT, dtype=torch.long, device=self.device)
        self.v_ids = torch.zeros(n, dtype=torch.long, device=self.device)
        self.v_logprob = torch.zeros(n, device=self.device)
        self.v_top_logprob = torch.zeros(n, k, device=self.device)
        self.v_top_ids = torch.zeros(n, k, dtype=torch.long, device=self.device)
        self.kv_order = torch.zeros(n, dtype=torch.long, device=self.device)  # a step's rows in kv_parts' order
        # The step: eager, compiled, and/or captured per (B, S, mode).
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs needs the model on a CUDA device")
        if compile:  # one specialisation per (B, S, mode) bucket: allow as many as there are buckets
            dynamo = torch._dynamo.config  # the limit's name before torch 2.7: cache_size_limit
            limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
            setattr(dynamo, limit, max(getattr(dynamo, limit), 256))
        self._compiled = compile
        self._body = torch.compile(self._decode_body, dynamic=False, fullgraph=True) if compile else self._decode_body
        self._verify_body = torch.compile(self._check_body, dynamic=False, fullgraph=True) if compile else self._check_body
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._pool = None

    # -- requests ----------------------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, stop_ids=frozenset()) -> Request:
        """Queue a request (token ids already checked against the vocabulary); returns its handle."""
        n = len(prompt_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        limit = self.context
        if n >= limit:
            raise ValueError(f"the prompt has {n} tokens; {self.describe_limit()}")
        req = Request(list(prompt_ids), params, frozenset(stop_ids), min(params.max_new_tokens, limit - n),
                      random_seed() if params.seed is None else params.seed, next(self._ids))
        req.matcher = matcher_for(params, self.tokenizer, self.model.config.vocab_size, req.stop_ids)  # grammar
        spec = parse_speculation(params.speculate)
        if spec is not None:
            req.drafter = Drafter(spec) if spec.kind == "ngram" else ModelDrafter(spec, self.draft_runner(spec))
        with self._lock:
            self._waiting.append(req)
        return req

    def submit_reads(self, ids: Sequence[int], reads: Sequence[int]) -> Request:
        """Queue a scoring request (ids already checked against the vocabulary): prefill `ids`, keep the
        final hidden states (the output layer's input) at positions `reads` (ascending) as
        `Request.hidden` (len(reads), C), then end ("scored") without decoding; its full blocks stay
        in the prefix cache. The cache serves only the blocks before the first read position: a
        cached position has no hidden state."""
        n, reads = len(ids), list(reads)
        if n == 0:
            raise ValueError("the input is empty")
        if n > self.context:
            raise ValueError(f"the input has {n} tokens; {self.describe_limit()}")
        if not reads or reads != sorted(set(reads)) or reads[0] < 0 or reads[-1] >= n:
            raise ValueError(f"reads must be distinct ascending positions in [0, {n}), got {reads!r}")
        req = Request(list(ids), SamplingParams(max_new_tokens=1), frozenset(), 0, 0, next(self._ids), reads=reads)
        with self._lock:
            self._waiting.append(req)
        return req

    @property
    def context(self) -> int:
        """The longest sequence a request may reach: `max_len`, or less if the pool holds fewer tokens."""
        return min(self.max_len, self.cache.tokens)

    def describe_limit(self) -> str:
        if self.cache.tokens < self.max_len:
            return f"the KV cache holds {self.cache.tokens} tokens (kv_cache_tokens)"
        small = self.max_len < self.model.config.max_position_embeddings
        return f"the context is {self.max_len}{' (the engine was sized below the model)' if small else ''}"

    def cancel(self, request: Request) -> None:
        """Stop `request` at the next step (its row and blocks are freed then); safe from any thread."""
        request.cancelled = True

    @property
    def busy(self) -> bool:
        """Whether any request is waiting, prefilling or decoding."""
        return bool(self._waiting or self.requests)

    def stats(self) -> dict:
        """Rows, blocks and prefix-cache counters, as /health and /metrics report them."""
        b = self.blocks
        return dict(running=len(self.requests), waiting=len(self._waiting), block_size=self.cache.block_size,
                    blocks_total=b.total, blocks_used=b.used, blocks_cached=b.cached,
                    blocks_free=b.available - b.cached, dtype=self.cache.stored, prefix_cache=b.prefix_cache,
                    prompt_tokens=self.prompt_tokens,
                    prefix_hit_tokens=self.hit_tokens, computed_tokens=self.computed_tokens,
                    preempted=self.preempted, draft_tokens=self.draft_tokens, accepted_tokens=self.accepted_tokens)

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
            if req.reads is not None:  # scoring requests: those at the head, together
                done, used = self._prefill_reads(budget)
                budget -= used
                events += [Event(r, None, "scored") for r in done]
                continue
            if not req._started:
                self._rematch(req)
            n = min(budget, len(req._todo) - req._written)
            logits = self._prefill(req, n)
            budget -= n
            if req._written == len(req._todo):
                self._prefilling.popleft()
                self.blocks.register(req._blocks, req._todo, self._salt(req))
                mode, row = self.params.mode([req.slot]), req.slot
                if req.matcher is not None:  # grammar: this row's allowed first tokens
                    self.params.fill_masks({row: req.matcher})
                token = self.params.sample(logits, row, mode)
                self.params.advance(row, token, torch.ones_like(token, dtype=torch.bool))
                if mode.logprobs:
                    self._store_logprobs(row, logits, token)
                logprob = self._host_logprobs(row, 1)[0] if mode.logprobs else None
                events += self._accept(req, int(token[0]), self._logprob(req, logprob), from_prefill=True)
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
            self._finish(req, "cancelled")
            events.append(Event(req, None, "cancelled"))
        return events

    def _admit(self) -> None:
        """Waiting requests, first come first served, while a row and their blocks are free."""
        with self._lock:
            if self._waiting and self._free:
                self._check_weights()
            while self._waiting and self._free:
                req = self._waiting[0]
                last = self._prefilling[-1] if self._prefilling else None
                if req.reads is not None and last is not None and last.reads is not None and self._waits_for(last, req):
                    return  # it takes those blocks from the cache once written, rather than blocks of its own now
                ids = req.prompt + req.tokens  # a preempted request resumes with what it has
                long = self.model.uses_long_rope(len(ids))
                salt = (long,)
                hit = self.blocks.match(self._matchable(req, ids), salt)
                need = -(-len(ids) // self.cache.block_size) - len(hit)
                try:
                    new, fresh = self.blocks.allocate(need)
                except OutOfBlocks:
                    self.blocks.release(hit)
                    return  # it waits for blocks; those behind it wait for it
                self._waiting.popleft()
                self.cache.zero(fresh)
                req.slot, req._admitted = self._free.pop(0), next(self._admissions)
                self.requests[req.slot] = req
                self.params.set(req.slot, req.params, req.seed, ids, step=len(req.tokens))
                req._blocks, req._long, req._todo, req._written = hit + new, long, ids, len(hit) * self.cache.block_size
                req._hidden = []  # a scoring request preempted mid-way reads its positions again
                self.cache.long_rope[req.slot] = long
                self._set_table(req)
                if not req.tokens and not req.preemptions:  # its first admission (not a resume or a re-prefill)
                    req.cached_tokens = req._written
                    self.prompt_tokens += len(ids)
                    self.hit_tokens += req._written
                self.computed_tokens += len(ids) - req._written
                req._started = False
                self._prefilling.append(req)

    def _rematch(self, req: Request) -> None:
        """Look the prompt up again as its prefill begins: requests admitted together (few-shot
        prompts, a shared system prompt) find the blocks that the ones before them have just
        written. Longer hits replace the row's unwritten blocks."""
        req._started = True
        bs, have = self.cache.block_size, req._written // self.cache.block_size
        hit = self.blocks.match(self._matchable(req, req._todo), self._salt(req))
        self.blocks.release(hit[:have])  # the row already holds these
        extra = hit[have:]
        if not extra:
            return
        self.blocks.release(req._blocks[have:have + len(extra)])  # never written: back to the free list
        req._blocks[have:have + len(extra)] = extra
        gained = len(extra) * bs
        req._written += gained
        self.computed_tokens -= gained
        if not req.preemptions and len(req._todo) == len(req.prompt):  # its first admission: count the hit
            req.cached_tokens += gained
            self.hit_tokens += gained
        self._set_table(req)

    @staticmethod
    def _matchable(req: Request, ids: list[int]) -> list[int]:
        """What of `ids` the prefix cache may serve: a scoring request's first read position and what
        follows are computed (`match` leaves the last token it is given to be computed)."""
        return ids if req.reads is None else ids[:req.reads[0] + 1]

    def _salt(self, req: Request) -> tuple:
        """What besides the tokens changes a row's keys: its LongRoPE set (the model's weights: `_check_weights`)."""
        return (req._long,)

    def _check_weights(self) -> None:
        """Drop the prefix cache and captured graphs when the model's weights or modules changed since
        the last admission (an adapter applied, a weight replaced or written in place): cached keys
        and captured pointers belong to the old ones."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        same = len(tensors) == len(self._weights) and all(
            ref() is t and version == t._version for t, (ref, version) in zip(tensors, self._weights))
        if not same:
            self.blocks.clear()
            self._graphs.clear()
            self._weights = [(weakref.ref(t), t._version) for t in tensors]

    def _set_table(self, req: Request) -> None:
        """Write the row's blocks into the device block table (the rest of the row: scratch)."""
        row = self.cache.block_table[req.slot]
        row.zero_()
        if req._blocks:
            row[:len(req._blocks)] = torch.tensor(req._blocks, dtype=torch.long)

    @torch.inference_mode()
    def _prefill(self, req: Request, n: int) -> torch.Tensor:
        """Write the request's next `n` ids into its blocks (attending over its written prefix
        only); logits (1, V) of the last one."""
        start = req._written
        tokens = torch.tensor([req._todo[start:start + n]], dtype=torch.long, device=self.device)
        positions = torch.arange(start, start + n, device=self.device)[None]
        logits = self.model(tokens, positions, self.cache, slot=req.slot, kv_len=start + n, last_only=True)
        req._written += n
        return logits[:, -1]

    @torch.inference_mode()
    def _prefill_reads(self, budget: int) -> tuple[list[Request], int]:
        """Prefill the scoring requests at the head of the queue in one forward, right-padded (each
        row at its own positions; padding at the scratch position): as many as fit `budget` padded
        tokens, the first at least (in chunks of `budget` if longer). A request that would take
        from the prefix cache a block the one before it is about to write waits for the next
        forward (the scorer sorts its inputs: requests that share a prefix are adjacent; `_admit`
        holds them back the same way, so they do not take blocks of their own meanwhile). With a
        sliding window, rows go together only while they fit in it (padding then sees every key).
        Returns the requests that ended ("scored") and the tokens computed."""
        window, batch, counts, end = self.model.config.sliding_window, [], [], 0
        for req in self._prefilling:
            if req.reads is None:
                break
            if not req._started:
                self._rematch(req)
            n = len(req._todo) - req._written
            if batch and ((len(batch) + 1) * max(n, *counts) > budget or self._waits_for(batch[-1], req)
                          or window is not None and max(end, len(req._todo)) > window):
                req._started = False  # not one token written: look it up again when its turn comes
                break
            batch.append(req)
            counts.append(min(n, budget))
            end = max(end, req._written + counts[-1])
        B, T = len(batch), max(counts)
        tokens = torch.zeros(B, T, dtype=torch.long)
        positions = torch.full((B, T), self.cache.scratch, dtype=torch.long)
        read, sizes = [], []  # the read positions' indices among the B*T, and how many per row
        for b, (req, n) in enumerate(zip(batch, counts)):
            start = req._written
            tokens[b, :n] = torch.tensor(req._todo[start:start + n])
            positions[b, :n] = torch.arange(start, start + n)
            read += [b * T + p - start for p in req.reads if start <= p < start + n]
            sizes.append(len(read) - sum(sizes))
        rows = torch.tensor([req.slot for req in batch], device=self.device)
        hidden = self.model(tokens.to(self.device), positions.to(self.device), self.cache, slot=rows, kv_len=end,
                            read=torch.tensor(read, dtype=torch.long, device=self.device), hidden=True)[0]
        done = []
        for req, n, part in zip(batch, counts, hidden.split(sizes)):  # part: (reads in this chunk, C)
            req._hidden.append(part)
            req._written += n
            if req._written == len(req._todo):
                self._prefilling.remove(req)
                self.blocks.register(req._blocks, req._todo, self._salt(req))
                req.hidden = torch.cat(req._hidden)
                self._finish(req, "scored")
                done.append(req)
        return done, sum(counts)

    def _waits_for(self, prev: Request, req: Request) -> bool:
        """Whether scoring request `req` shares with `prev`, which is prefilling, a full block that
        it could take from the prefix cache once `prev` has written it."""
        if prev._long != self.model.uses_long_rope(len(req.prompt)):
            return False
        limit, n = min(len(prev._todo), req.reads[0]), 0
        while n < limit and prev._todo[n] == req.prompt[n]:
            n += 1
        return n // self.cache.block_size > prev._written // self.cache.block_size

    def _accept(self, req: Request, token: int, logprob=None, from_prefill: bool = False) -> list[Event]:
        """Host-side bookkeeping for a token drawn for `req` (with its logprobs, if asked for)."""
        if token in req.stop_ids:  # not kept: every key before it is written (by the step that drew it)
            self._finish(req, "stop", written=req.length)
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
        row = req.slot
        if self.model.uses_long_rope(req.length) and not req._long:
            self._requeue(req)  # the LongRoPE crossing: this row alone is prefilled again, with the long set
        elif from_prefill:
            self.tokens_in[row], self.positions[row], self.active[row] = token, req.length - 1, True
            self._decoding.add(row)
        return [Event(req, token, None, logprob)]

    def _store_logprobs(self, first: int, logits: torch.Tensor, ids: torch.Tensor) -> None:
        end = first + ids.shape[0]
        self.logprob[first:end], self.top_logprob[first:end], self.top_ids[first:end] = \
            logprobs_of(logits, ids, self.top_ids.shape[1])

    def _host_logprobs(self, first: int, n: int) -> list[list[float]]:
        """Rows first..first+n-1's stored logprobs in one copy to the host: [drawn, top values..., top ids...]."""
        end = first + n
        return torch.cat([self.logprob[first:end, None], self.top_logprob[first:end],
                          self.top_ids[first:end].to(self.top_logprob.dtype)], dim=1).tolist()  # ids < 2^24: exact

    @staticmethod
    def _logprob(req: Request, row: list[float] | None) -> tuple[float, list[tuple[int, float]]] | None:
        """A row's stored logprobs as Python numbers, if its request asked for them."""
        k = req.params.logprobs
        if k is None or row is None:
            return None
        m = (len(row) - 1) // 2
        return row[0], [(int(i), v) for i, v in zip(row[1 + m:1 + m + k], row[1:1 + k])]

    def _release(self, req: Request, written: int | None = None) -> None:
        """Give the row and its blocks back; its full, written blocks stay in the prefix cache.
        `written`: positions whose keys are in its blocks (default: a decoding row's last token is
        not fed yet)."""
        if written is None:
            written = req._written if req in self._prefilling or req.slot not in self._decoding else req.length - 1
        self.blocks.register(req._blocks, (req.prompt + req.tokens)[:written] if req._todo else [], self._salt(req))
        self.blocks.release(req._blocks)
        if req in self._prefilling:
            self._prefilling.remove(req)
        self._set_idle(req.slot)
        req._blocks, req._todo, req._written = [], [], 0
        self.cache.block_table[req.slot].zero_()
        del self.requests[req.slot]
        self._free.append(req.slot)
        self._free.sort()
        req.slot = None

    def _finish(self, req: Request, reason: str, written: int | None = None) -> None:
        req.finish_reason = reason
        self._release(req, written)
        kernels = sys.modules.get("phi3.kernels")  # loaded only where a CPU decode step offered its layers to C
        if not self.requests and kernels is not None:
            kernels.forget(self.model)  # idle: let go of what the C layers read (weights may change before the next request)

    def _requeue(self, req: Request) -> None:
        """Back to the head of the queue, to be prefilled again with all it has (preemption, LongRoPE crossing)."""
        self._release(req)
        with self._lock:
            self._waiting.appendleft(req)

    def _set_idle(self, row: int) -> None:
        if row in self._decoding:
            self._decoding.discard(row)
            self.active[row], self.positions[row] = False, self.cache.scratch

    def _grow(self) -> None:
        """Give each decoding row the block its next key goes into; preempt the newest rows where the pool is out."""
        bs = self.cache.block_size
        for row in sorted(self._decoding, key=lambda r: self.requests[r]._admitted):
            req = self.requests.get(row)
            if req is None or row not in self._decoding or (req.length - 1) // bs < len(req._blocks):
                continue
            while True:
                try:
                    new, fresh = self.blocks.allocate(1)
                    break
                except OutOfBlocks:
                    newest = max(self.requests.values(), key=lambda r: r._admitted)
                    newest.preemptions += 1
                    self.preempted += 1
                    self._requeue(newest)
                    if newest is req:
                        break
            if req.slot is None:
                continue
            self.cache.zero(fresh)
            req._blocks += new
            self.cache.block_table[row, len(req._blocks) - 1] = new[0]

    # -- the decode step ---------------------------------------------------------------------------
    def _decode(self) -> list[Event]:
        self._grow()
        if not self._decoding:
            return []
        guesses = self._guesses()
        start = time.perf_counter()
        if guesses:
            events = self._verify(guesses)
            self._verify_seconds = moving_average(self._verify_seconds, time.perf_counter() - start)
            return events
        events = self._plain_decode()
        if self._runners:  # a draft model's worth is judged against a plain step's time
            self._step_seconds = moving_average(self._step_seconds, time.perf_counter() - start)
        return events

    def _plain_decode(self) -> list[Event]:
        rows = sorted(self._decoding)
        batch = min(self.slots, 1 << rows[-1].bit_length())  # power of two > the highest busy row
        parts = self._kv_parts([self.requests[r].length if r in self._decoding else 0 for r in range(batch)])
        mode = self.params.mode(rows)
        if mode.grammar:  # grammar: the constrained rows' allowed tokens, before the step
            self.params.fill_masks({r: self.requests[r].matcher for r in rows if self.requests[r].matcher})
        self._run(self._body, (batch, parts, mode))
        ids = self.next_ids[:batch].tolist()  # the one host sync of the step
        logprobs = self._host_logprobs(0, batch) if mode.logprobs else None
        events = []
        for r in rows:
            req = self.requests[r]
            events += self._accept(req, ids[r], self._logprob(req, logprobs[r] if logprobs else None))
        return events

    # -- speculative decoding (speculate.py) --------------------------------------------------------
    def draft_runner(self, spec) -> DraftRunner:
        """The engine of `spec`'s draft model (a `Speculation` of kind "model": a loaded `LLM`, or
        "layers:N"), built on first use and kept; a ValueError, before any work, where the draft has
        another vocabulary, is not loaded, or does not fit in memory."""
        draft = spec.draft
        key = draft if isinstance(draft, str) else id(draft)
        runner = self._runners.get(key)
        if runner is not None:
            return runner
        if isinstance(draft, str) and draft.startswith("layers:"):
            model, name = layer_slice(self.model, int(draft.split(":")[1])), draft
        else:
            if isinstance(draft, str):
                if self.load_draft is None:
                    raise ValueError(f"the draft model {draft!r} is not loaded: LLM.generate and phi3 serve load a "
                                     f"draft named by a string; to an Engine pass the loaded LLM")
                draft = self.load_draft(draft)
            model, name = draft.model, f"the draft model {getattr(draft, 'name', '') or ''}".rstrip()
            if model is self.model:
                name = "the model itself"
            check_vocabulary(self.model, model, self.tokenizer, getattr(draft, "tokenizer", None), name)
            device = next(model.parameters()).device
            if device != self.device:
                raise ValueError(f"{name} is on {device}, the model on {self.device}: load the draft on the same device")
        runner = self._runners[key] = DraftRunner(model, self, name)
        runner.source = draft  # kept alive: the key may be its id
        return runner

    def _guesses(self) -> dict[int, list[int]]:
        """This step's guessed tokens of each speculating decoding row that has some ({row: ids}), with
        the blocks their positions need taken now; a guess is cut where the pool has no block to spare
        (a guess never preempts a row). Rows with a grammar decode plainly. Rows with a draft model
        are drafted together, one batch per draft model."""
        guesses, bs, by_model = {}, self.cache.block_size, {}
        for row in sorted(self._decoding):
            req = self.requests[row]
            drafter = req.drafter
            if drafter is None or req.matcher is not None or not drafter.wants_draft():
                continue
            # k + 1 draws at most: within max_new_tokens and the context (the LongRoPE crossing and
            # stops end a row's accepted tokens where plain decoding would end them: `_verify`)
            k = min(drafter.spec.k, req.max_new - len(req.tokens) - 1, self.context - req.length - 1)
            if k <= 0:
                continue
            if isinstance(drafter, ModelDrafter):
                by_model.setdefault(id(drafter.runner), (drafter.runner, []))[1].append((row, k))
                continue
            have = len(drafter.seq)
            if have < len(req.prompt):
                drafter.extend(req.prompt[have:])
                have = len(req.prompt)
            drafter.extend(req.tokens[have - len(req.prompt):])
            guesses[row] = drafter.propose(k)
        for runner, rows in by_model.values():
            drafters = [self.requests[row].drafter for row, _ in rows]
            if not draft_pays(drafters, max(k for _, k in rows), runner, self._step_seconds, self._verify_seconds):
                steps = probe_pause(runner, self._step_seconds, self._verify_seconds)
                for drafter in drafters:  # slower than plain steps: try again later
                    drafter.pause(steps)
                continue
            drafts = runner.propose([(self.requests[row].prompt + self.requests[row].tokens, k) for row, k in rows])
            guesses.update((row, guess) for (row, _), guess in zip(rows, drafts))
        for row in sorted(guesses):
            req, guess = self.requests[row], guesses[row]
            need = (req.length - 1 + len(guess)) // bs + 1 - len(req._blocks)  # blocks up to its last position
            if guess and need > 0:
                try:
                    new, fresh = self.blocks.allocate(need)
                    self.cache.zero(fresh)
                    first = len(req._blocks)
                    req._blocks += new
                    self.cache.block_table[row, first:first + need] = torch.tensor(new, dtype=torch.long)
                except OutOfBlocks:
                    guesses[row] = guess = guess[:len(req._blocks) * bs - req.length]
            if not guess:
                del guesses[row]
        return guesses

    def _verify(self, guesses: dict[int, list[int]]) -> list[Event]:
        """One forward over every decoding row's last token and its guesses (N positions in all), a
        draw at each as plain decoding would draw it there; each row keeps its draws up to the first
        that differs from its guess, that one included."""
        rows = sorted(self._decoding)
        tokens, positions, owners, ahead, guessed, spans = [], [], [], [], [], []
        for row in rows:
            req, guess = self.requests[row], guesses.get(row, [])
            spans.append((row, len(tokens), guess))
            for i, token in enumerate([req.tokens[-1], *guess]):
                tokens.append(token)
                positions.append(req.length - 1 + i)
                owners.append(row)
                ahead.append(i)
                guessed.append(guess[:i])
        n = len(tokens)
        size = n if not (self.cuda_graphs or self._compiled) else min(len(self.v_ids), 1 << (n - 1).bit_length())
        vocab = self.model.config.vocab_size
        pad = size - n  # a fixed-shape step's spare positions: row 0's scratch position (block 0)
        host = torch.tensor([tokens + [0] * pad, positions + [self.cache.scratch] * pad, owners + [0] * pad,
                             ahead + [0] * pad], dtype=torch.long)
        for buffer, values in zip((self.v_tokens, self.v_positions, self.v_rows, self.v_ahead), host):
            buffer[:size].copy_(values, non_blocking=True)
        mode = self.params.mode(rows)
        if mode.penalty:  # the ids each position's draw has seen besides its row's: the guesses before it
            table = torch.full((size, MAX_DRAFT), vocab, dtype=torch.long)
            for j, before in enumerate(guessed):
                table[j, :len(before)] = torch.tensor(before, dtype=torch.long)
            self.v_guessed[:size].copy_(table)
        if mode.grammar:
            self.params.fill_masks({r: self.requests[r].matcher for r in rows if self.requests[r].matcher})
        parts = self._kv_parts([p + 1 for p in positions] + [0] * pad)
        self._run(self._verify_body, (size, parts, mode))
        drawn = self.v_ids[:n].tolist()
        logprobs = None
        if mode.logprobs:
            logprobs = torch.cat([self.v_logprob[:n, None], self.v_top_logprob[:n],
                                  self.v_top_ids[:n].to(self.v_top_logprob.dtype)], dim=1).tolist()
        events, going = [], []
        for row, start, guess in spans:
            req = self.requests[row]
            hits = 0
            while hits < len(guess) and drawn[start + hits] == guess[hits]:
                hits += 1
            if guess:
                req.drafted += len(guess)
                req.accepted += hits
                self.draft_tokens += len(guess)
                self.accepted_tokens += hits
                req.drafter.missed(hits, len(guess))
            for i in range(hits + 1):  # as plain decoding: a stop, the length or the LongRoPE crossing ends it
                events += self._accept(req, drawn[start + i], self._logprob(req, logprobs[start + i] if logprobs else None))
                if req.slot != row or row not in self._decoding:
                    break
            else:
                going.append((row, req, hits + 1))
        if going:  # the rows' next input, position, step count and seen ids, as the plain step keeps them
            index = torch.tensor([row for row, _, _ in going], device=self.device)
            self.tokens_in[index] = torch.tensor([req.tokens[-1] for _, req, _ in going], device=self.device)
            self.positions[index] = torch.tensor([req.length - 1 for _, req, _ in going], device=self.device)
            self.params.step[index] += torch.tensor([took for _, _, took in going], device=self.device)
            seen_rows = [row for row, _, took in going for _ in range(took)]
            seen_ids = [t for _, req, took in going for t in req.tokens[-took:]]
            self.params.seen[torch.tensor(seen_rows, device=self.device), torch.tensor(seen_ids, device=self.device)] = True
        return events

    def _check_body(self, n: int, parts: tuple[tuple[int, int], ...], mode: Mode) -> None:
        """The verify step's forward and draws over the first n static positions (no row state changes)."""
        rows = self.v_rows[:n]
        logits = self.model(self.v_tokens[:n, None], self.v_positions[:n, None], self.cache,
                            kv_len=parts[-1][1], kv_parts=self._parts_of(parts), slot=rows)[:, -1]  # (N, V)
        ids = self.params.sample_at(logits, rows, self.v_ahead[:n], mode, self.v_guessed[:n])
        if mode.logprobs:
            self.v_logprob[:n], self.v_top_logprob[:n], self.v_top_ids[:n] = logprobs_of(logits, ids, self.v_top_ids.shape[1])
        self.v_ids[:n] = ids

    def _kv_parts(self, lengths: list[int]) -> tuple[tuple[int, int], ...]:
        """The step's parts (kv_parts), the rows' order written to `kv_order` where there are several."""
        order, parts = kv_parts(lengths, self.cache.scratch)
        if len(parts) > 1:
            self.kv_order[:len(order)].copy_(torch.tensor(order, dtype=torch.long), non_blocking=True)
        return parts

    def _parts_of(self, parts: tuple[tuple[int, int], ...]) -> list[tuple[torch.Tensor, int]] | None:
        """Phi3.forward's kv_parts for a step's parts (None for one): views of `kv_order` (fixed
        addresses, so that a captured step reads each step's order)."""
        if len(parts) == 1:
            return None
        out, start = [], 0
        for n, kv_len in parts:
            out.append((self.kv_order[start:start + n], kv_len))
            start += n
        return out

    def _run(self, body, shape: tuple) -> None:
        """Run `body(*shape)`: eager, compiled, or a CUDA graph captured per (body, shape)."""
        if not self.cuda_graphs:
            with torch.inference_mode():
                body(*shape)
            return
        key = (body is self._body, *shape)
        if key not in self._graphs:
            self._graphs[key] = self._capture(body, shape)
        self._graphs[key].replay()

    def _decode_body(self, batch: int, parts: tuple[tuple[int, int], ...], mode: Mode) -> None:
        """Rows 0..batch-1 feed their next id and draw the one after (fixed shapes; in place)."""
        active = self.active[:batch]
        logits = self.model(self.tokens_in[:batch, None], self.positions[:batch, None], self.cache,
                            kv_len=parts[-1][1], kv_parts=self._parts_of(parts))[:, -1]  # (B, V)
        ids = self.params.sample(logits, 0, mode)  # (B,)
        if mode.logprobs:
            self._store_logprobs(0, logits, ids)
        self.params.advance(0, ids, active)
        self.next_ids[:batch] = ids
        self.tokens_in[:batch] = torch.where(active, ids, self.tokens_in[:batch])
        self.positions[:batch] += active

    def _capture(self, body, shape: tuple) -> "torch.cuda.CUDAGraph":
        """Record the step for this shape. The warm-up run changes no state: every row is marked
        inactive for it (a busy row rewrites the same keys at its own position, which the real
        step writes again; a verify step changes no row state at all)."""
        saved = self.active.clone()
        self.active.zero_()
        with torch.cuda.device(self.device):
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.inference_mode():
                body(*shape)
            torch.cuda.current_stream().wait_stream(stream)
            self._pool = self._pool or torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool), torch.inference_mode():
                body(*shape)
        self.active.copy_(saved)
        return graph


UNKNOWN_MEMORY_TOKENS = 4096  # per row, where the free memory cannot be read
POOL_SHARE = {"cuda": 0.8}  # of free memory a default pool may take (the CPU's: 0.5, touched only as used)


def default_pool_tokens(model: Phi3, slots: int, max_len: int, device: torch.device, dtype: torch.dtype,
                        kv_dtype: torch.dtype | None = None) -> int:
    """`slots * max_len` positions, or as many as fit in a share of the free memory (at least one
    block per row, so that `check_memory` says what is short rather than a pool of nothing)."""
    want = slots * max_len
    free = free_memory(device)
    if free is None:  # the system does not say: a pool that surely fits, not every row's whole context
        return min(want, slots * UNKNOWN_MEMORY_TOKENS)
    per_token = KVCache.nbytes(model.config, 1, dtype, kv_dtype)
    fits = int(free * POOL_SHARE.get(device.type, 0.5)) // per_token
    return max(min(want, fits), slots * BLOCK_SIZE)


def check_memory(model: Phi3, slots: int, max_len: int, device: torch.device, dtype: torch.dtype,
                 tokens: int | None = None, block_size: int = BLOCK_SIZE, kv_dtype: torch.dtype | None = None) -> int:
    """A clear error, before allocating, when the sizes are wrong or a pool of `tokens` positions
    cannot fit; else the pool's size (`default_pool_tokens` when `tokens` is None)."""
    config = model.config
    if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
        raise ValueError(f"slots must be a positive integer, got {slots!r}")
    if not isinstance(max_len, int) or isinstance(max_len, bool) or not 2 <= max_len <= config.max_position_embeddings:
        raise ValueError(f"max_len must be an integer in [2, {config.max_position_embeddings}] (the model's "
                         f"context), got {max_len!r}")
    tokens = default_pool_tokens(model, slots, max_len, device, dtype, kv_dtype) if tokens is None else tokens
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < slots * block_size:
        raise ValueError(f"kv_cache_tokens must be an integer of at least {slots * block_size} (one block of "
                         f"{block_size} per row, {slots} rows), got {tokens!r}")
    need = KVCache.nbytes(config, tokens, dtype, kv_dtype) + slots * (config.vocab_size + 1)
    free = free_memory(device)
    if free is not None and need > 0.9 * free:
        gib = 2**30
        raise ValueError(f"a KV cache of {tokens} tokens needs {need / gib:.2f} GiB and {device} has "
                         f"{free / gib:.2f} GiB free: ask for fewer kv_cache_tokens")
    return tokens


def free_memory(device: torch.device) -> int | None:
    """Bytes free on `device` (CUDA: the driver's count; CPU and MPS: the system's available memory,
    psutil's reading of MemAvailable on Linux, of the VM statistics on macOS, of
    GlobalMemoryStatusEx on Windows), or None where the system does not say."""
    if device.type == "cuda":  # what the driver has free, and what torch's allocator holds unused
        return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    import psutil

    try:
        return int(psutil.virtual_memory().available)
    except (OSError, RuntimeError, NotImplementedError):  # a platform psutil cannot read
        return None
