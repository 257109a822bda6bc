"""`LLM`: logits, generate, stream: the text layer over the engine.

Generation is layered: the engine (`phi3.engine`) yields token ids per request; `TextStream`
turns one request's ids into text chunks (UTF-8 safe, stop strings held back until they are ruled
out); `stream` yields those chunks, `generate` joins them, for one prompt or a batch. The CLI,
`pipeline` and the server all read these.

The engine is allocated once and reused across calls (its paged KV cache holds what each call
needs, and keeps the prompts' full blocks for the next calls: a chat's next turn, few-shot
prompts with the same examples, the same system prompt); it is rebuilt only when `max_batch`,
`compile` or `prefix_cache` change between calls.
"""

from __future__ import annotations

import gc
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .config import Phi3Config
from .engine import Engine
from .model import Phi3
from .sampling import SamplingParams

MAX_BATCH = 64  # most sequences an LLM decodes at once; more prompts wait for a free slot


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Chunk:
    """One piece of a streamed answer; the last one has `finish_reason` and `usage`."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None


@dataclass
class Completion:
    text: str
    token_ids: list[int]  # the new tokens, without the stop token that ended them
    finish_reason: str  # "stop" or "length"
    usage: Usage


Prompt = str | Sequence[int] | Sequence[dict]


class TextStream:
    """One request's token ids -> text chunks: UTF-8-safe decoding, stop strings cut.

    Text that could still grow into a stop string is held back until it is ruled out. Without a
    tokenizer every id is a chunk of its own with empty text."""

    def __init__(self, tokenizer, stop: Sequence[str], prompt_tokens: int):
        if stop and tokenizer is None:
            raise ValueError("stop strings need a tokenizer, and this model was loaded without one")
        self.decoder = tokenizer.decoder(skip_special_tokens=True) if tokenizer is not None else None
        self.stop, self.prompt_tokens = tuple(stop), prompt_tokens
        self.pending, self.ids, self.count = "", [], 0
        self.done = False

    def push(self, token: int) -> Chunk | None:
        """Take one new id; a chunk when text is ready (finish_reason "stop" if a stop string appeared)."""
        self.ids.append(token)
        self.count += 1
        if self.decoder is not None:
            self.pending += self.decoder.step(token)
        cut = _find_stop(self.pending, self.stop)
        if cut is not None:
            self.done = True
            return Chunk(self.pending[:cut], self.ids, "stop", Usage(self.prompt_tokens, self.count))
        keep = _held_back(self.pending, self.stop)
        if len(self.pending) > keep or self.decoder is None:
            chunk = Chunk(self.pending[: len(self.pending) - keep], self.ids)
            self.pending, self.ids = self.pending[len(self.pending) - keep:], []
            return chunk
        return None

    def close(self, finish_reason: str) -> Chunk:
        """The last chunk: what was held back, with the finish reason and usage."""
        self.done = True
        pending = self.pending + (self.decoder.flush() if self.decoder is not None else "")
        cut = _find_stop(pending, self.stop)
        if cut is not None:
            pending, finish_reason = pending[:cut], "stop"
        return Chunk(pending, self.ids, finish_reason, Usage(self.prompt_tokens, self.count))


class LLM:
    """A loaded model with its tokenizer. Build one with `phi3.load`."""

    def __init__(self, model: Phi3, tokenizer=None, *, stop_ids: Sequence[int] | None = None, name: str = "",
                 max_batch: int = MAX_BATCH, kv_cache_tokens: int | None = None, prefix_cache: bool = True,
                 kv_cache_dtype: str = "auto"):
        self.model = model
        self.config: Phi3Config = model.config
        self.tokenizer = tokenizer
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.stop_ids = stop_ids
        self.name = name
        self.max_batch = max_batch
        self.compile = False  # compile the engine's decode step with torch.compile (set before generating)
        self.kv_cache_tokens = kv_cache_tokens  # the engine's KV pool in positions (None: see engine_for)
        self.prefix_cache = prefix_cache  # reuse the keys of prompt prefixes seen before
        self.kv_cache_dtype = kv_cache_dtype  # "auto" (the model's dtype) or "int8" (approximate; see cache.py)
        self._engine: Engine | None = None
        self._drafts: dict[str, LLM] = {}  # speculative decoding's draft models, by name (load_draft)

    def __repr__(self) -> str:
        return f"LLM({self.name or 'model'}, {self.config.num_parameters() / 1e9:.2f}B params, {self.device}, {self.dtype})"

    @property
    def stop_ids(self) -> frozenset[int]:
        """Ids that end generation: the tokenizer's (its generation config), unless set explicitly."""
        if self._stop_ids is not None:
            return self._stop_ids
        return self.tokenizer.stop_ids if self.tokenizer is not None else frozenset()

    @stop_ids.setter
    def stop_ids(self, ids: Sequence[int] | None) -> None:
        self._stop_ids = None if ids is None else frozenset(ids)

    # -- one forward -----------------------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """(len, vocab) fp32: one pass over the whole sequence, no cache; LongRoPE factors by its length."""
        tokens = self._tensor(self._check_ids(token_ids))[None]
        return self.model(tokens)[0].float()

    # -- generation ------------------------------------------------------------------------------
    def generate(self, prompt, params=None, **sampling):
        """Complete `prompt` (text, chat messages or token ids) -> a `Completion`; or a list of
        prompts -> one `Completion` per prompt, decoded together.

        Options as keywords (`max_new_tokens=64, temperature=0.7, …`) or one `SamplingParams`;
        for a batch also a list of `SamplingParams`, one per prompt. Each row's tokens are those
        it gets alone (greedy; and seeded sampling: a row's seed gives the same tokens whatever
        else is in the batch). More prompts than `max_batch` wait for a free slot.
        """
        if _is_batch(prompt):
            return self._generate_batch(list(prompt), params, sampling)
        texts, ids, last = [], [], None
        for last in self.stream(prompt, params, **sampling):
            texts.append(last.text)
            ids.extend(last.token_ids)
        return Completion("".join(texts), ids, last.finish_reason, last.usage)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None, **sampling) -> Iterator[Chunk]:
        """Yield text chunks as tokens arrive; their concatenation is `generate(...).text`."""
        params = _params(params, sampling)
        prompt_ids = self.encode_prompt(prompt)
        text = TextStream(self.tokenizer, params.stop, len(prompt_ids))
        tokens = self.engine_for([(len(prompt_ids), params)]).generate_step(prompt_ids, params, self.stop_ids)
        while True:
            try:
                token = next(tokens)
            except StopIteration as end:
                yield text.close(end.value)
                return
            chunk = text.push(token)
            if chunk is not None:
                if chunk.finish_reason is not None:
                    tokens.close()  # cancels the request
                yield chunk
                if text.done:
                    return

    def _generate_batch(self, prompts: list, params, sampling: dict) -> list[Completion]:
        if isinstance(params, (list, tuple)):
            if sampling:
                raise TypeError("pass either SamplingParams or keyword options, not both")
            if len(params) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams: give one, or one per prompt")
            if not all(isinstance(p, SamplingParams) for p in params):
                raise TypeError("a list of params must hold SamplingParams")
            per_row = list(params)
        else:
            per_row = [_params(params, sampling)] * len(prompts)
        ids = [self.encode_prompt(p) for p in prompts]
        engine = self.engine_for([(len(i), p) for i, p in zip(ids, per_row)])
        texts = [TextStream(self.tokenizer, p.stop, len(i)) for i, p in zip(ids, per_row)]
        chunks: list[list[Chunk]] = [[] for _ in prompts]
        requests = [engine.submit(i, p, self.stop_ids) for i, p in zip(ids, per_row)]
        row = {req.id: k for k, req in enumerate(requests)}
        try:
            while not all(t.done for t in texts):
                for event in engine.step():
                    k = row.get(event.request.id)
                    if k is None or texts[k].done:
                        continue
                    if event.token is not None:
                        chunk = texts[k].push(event.token)
                        if chunk is not None:
                            chunks[k].append(chunk)
                            if chunk.finish_reason is not None:
                                engine.cancel(requests[k])
                    if event.finish_reason is not None and not texts[k].done:
                        chunks[k].append(texts[k].close(event.finish_reason))
        finally:
            for req in requests:
                if not req.finished:
                    engine.cancel(req)
        return [Completion("".join(c.text for c in cs), [t for c in cs for t in c.token_ids], cs[-1].finish_reason,
                           cs[-1].usage) for cs in chunks]

    def engine_for(self, requests: Sequence[tuple[int, SamplingParams]]) -> Engine:
        """The engine, built on first use: `max_batch` rows over one paged KV cache of
        `kv_cache_tokens` positions (default: as many as the rows could fill, capped by free memory),
        kept across calls so that later prompts reuse the keys of earlier ones (`prefix_cache`).
        Checks that these (prompt length, params) fit the model's context."""
        context = self.config.max_position_embeddings
        for n, _ in requests:
            if n >= context:
                raise ValueError(f"the prompt has {n} tokens; the model's context is {context}")
        engine = self._engine
        if engine is not None and (engine.slots, engine._compiled, engine.blocks.prefix_cache, engine.kv_cache_dtype) != \
                (self.max_batch, self.compile, self.prefix_cache, self.kv_cache_dtype) and not engine.busy:
            self._engine = engine = None  # settings changed since it was built: free its cache first
            gc.collect()  # an engine holds bound methods of itself (its step bodies): freed by the cycle collector
        if engine is None:
            engine = self._engine = Engine(self.model, slots=self.max_batch, kv_cache_tokens=self.kv_cache_tokens,
                                           prefix_cache=self.prefix_cache, compile=self.compile,
                                           tokenizer=self.tokenizer, kv_cache_dtype=self.kv_cache_dtype)
            engine.load_draft = self.load_draft
        return engine

    def load_draft(self, name: str) -> LLM:
        """The draft model `name` (anything `phi3.load` reads) for speculative decoding, loaded once on
        this model's device in its dtype and kept; a ValueError first where its weights' files
        (local ones) are larger than the free memory."""
        drafts = self._drafts
        if name not in drafts:
            from pathlib import Path

            from .engine import free_memory
            from .loader import load

            path = Path(name)
            files = [path] if path.is_file() else [*path.glob("*.safetensors"), *path.glob("*.gguf")] if path.is_dir() else []
            need, free = sum(f.stat().st_size for f in files), free_memory(self.device)
            if free is not None and need > 0.9 * free:
                raise ValueError(f"the draft model {name} does not fit: its weights are {need / 2**30:.2f} GiB and "
                                 f"{self.device} has {free / 2**30:.2f} GiB free")
            try:
                drafts[name] = load(name, device=self.device, dtype=self.dtype)
            except (OSError, ValueError) as e:
                raise ValueError(f"the draft model {name} did not load: {e}") from e
        return drafts[name]

    def encode_prompt(self, prompt: Prompt, tools: list | None = None) -> list[int]:
        """Token ids of raw text (no template), chat messages (template + generation prompt; `tools`:
        OpenAI's function definitions, see `phi3.tools`) or ids."""
        if isinstance(prompt, str):
            return self._check_ids(self._require_tokenizer("a text prompt").encode(prompt))
        if isinstance(prompt, Sequence) and prompt and all(isinstance(m, dict) for m in prompt):
            tok = self._require_tokenizer("chat messages")
            text = tok.apply_chat_template(list(prompt), add_generation_prompt=True, tools=tools)
            return self._check_ids(tok.encode(text, add_special_tokens=False))
        return self._check_ids(prompt)

    # -- helpers ---------------------------------------------------------------------------------
    def _tensor(self, ids: Sequence[int]) -> torch.Tensor:
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def _check_ids(self, ids) -> list[int]:
        """Token ids as python ints (numpy and 0-d tensor integers accepted), each inside the vocabulary."""
        ids, out = list(ids), []
        if not ids:
            raise ValueError("the prompt is empty")
        for i in ids:
            try:
                value = operator.index(i) if not isinstance(i, bool) else None
            except TypeError:
                value = None
            if value is None or not 0 <= value < self.config.vocab_size:
                raise ValueError(f"token ids must be integers in [0, {self.config.vocab_size}); got {i!r}")
            out.append(value)
        return out

    def _require_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise ValueError(f"{what} needs a tokenizer, and this model was loaded without one")
        return self.tokenizer


def _params(params: SamplingParams | None, sampling: dict) -> SamplingParams:
    if params is not None and sampling:
        raise TypeError("pass either a SamplingParams or keyword options, not both")
    if params is not None and not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
    return params or SamplingParams(**sampling)


def _is_batch(prompt) -> bool:
    """A list of prompts (texts, id lists, conversations), as opposed to one prompt."""
    if isinstance(prompt, (list, tuple)) and not prompt:
        raise ValueError("the prompt is empty (an empty list is neither a prompt nor a batch of prompts)")
    return isinstance(prompt, (list, tuple)) and all(
        isinstance(p, str) or (isinstance(p, (list, tuple)) or getattr(p, "ndim", 0) == 1) for p in prompt)


def _find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index where the earliest stop string starts in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
