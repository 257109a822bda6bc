"""`LLM`: logits, generate, stream; the one decode loop; the LongRoPE crossing.

Generation is layered generators: `_decode` yields token ids, `stream` turns them into text
chunks (UTF-8 safe, stop strings held back until they are ruled out), `generate` joins the chunks.
The CLI, `pipeline` and the server all read `stream`.

The LongRoPE crossing: keys are cached after RoPE. When a sequence whose cache was filled with
the short factors reaches `original_max_position_embeddings + 1` tokens, the whole sequence is
run again with the long factors, overwriting the cache, exactly as transformers does. One slow
step, the same tokens as the reference.
"""

from __future__ import annotations

import operator
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .cache import KVCache
from .config import Phi3Config
from .model import Phi3
from .sampling import SamplingParams, sample

PREFILL_CHUNK = 2048  # tokens per prefill step: bounds the (chunk, cache) attention mask


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


class LLM:
    """A loaded model with its tokenizer. Build one with `phi3.load`."""

    def __init__(self, model: Phi3, tokenizer=None, *, stop_ids: Sequence[int] | None = None, name: str = ""):
        self.model = model
        self.config: Phi3Config = model.config
        self.tokenizer = tokenizer
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.stop_ids = stop_ids
        self.name = name

    @property
    def stop_ids(self) -> frozenset[int]:
        """Ids that end generation: the tokenizer's (its generation config), unless set explicitly."""
        if self._stop_ids is not None:
            return self._stop_ids
        return self.tokenizer.stop_ids if self.tokenizer is not None else frozenset()

    @stop_ids.setter
    def stop_ids(self, ids: Sequence[int] | None) -> None:
        self._stop_ids = None if ids is None else frozenset(ids)

    def __repr__(self) -> str:
        return f"LLM({self.name or 'model'}, {self.config.num_parameters() / 1e9:.2f}B params, {self.device}, {self.dtype})"

    # -- one forward -----------------------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """(len, vocab) fp32: one pass over the whole sequence, no cache; LongRoPE factors by its length."""
        tokens = self._tensor(self._check_ids(token_ids))[None]
        return self.model(tokens)[0].float()

    # -- generation ------------------------------------------------------------------------------
    def generate(self, prompt: Prompt, params: SamplingParams | None = None, **sampling) -> Completion:
        """Complete `prompt` (text, chat messages or token ids).

        Options as keywords (`max_new_tokens=64, temperature=0.7, …`) or one `SamplingParams`.
        """
        texts, ids, last = [], [], None
        for last in self.stream(prompt, params, **sampling):
            texts.append(last.text)
            ids.extend(last.token_ids)
        return Completion("".join(texts), ids, last.finish_reason, last.usage)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None, **sampling) -> Iterator[Chunk]:
        """Yield text chunks as tokens arrive; their concatenation is `generate(...).text`."""
        if params is not None and sampling:
            raise TypeError("pass either a SamplingParams or keyword options, not both")
        params = params or SamplingParams(**sampling)
        prompt_ids = self.encode_prompt(prompt)
        # Without a tokenizer (a bare checkpoint) the chunks carry ids and no text.
        decoder = self.tokenizer.decoder(skip_special_tokens=True) if self.tokenizer is not None else None
        if params.stop and decoder is None:
            raise ValueError("stop strings need a tokenizer, and this model was loaded without one")
        tokens = self._decode(prompt_ids, params)
        pending, ids, count = "", [], 0
        while True:
            try:
                token = next(tokens)
            except StopIteration as end:
                finish = end.value
                break
            ids.append(token)
            count += 1
            pending += decoder.step(token) if decoder is not None else ""
            cut = _find_stop(pending, params.stop)
            if cut is not None:
                tokens.close()
                yield Chunk(pending[:cut], ids, "stop", Usage(len(prompt_ids), count))
                return
            keep = _held_back(pending, params.stop)
            if len(pending) > keep:
                yield Chunk(pending[: len(pending) - keep], ids)
                pending, ids = pending[len(pending) - keep:], []
        pending += decoder.flush() if decoder is not None else ""
        cut = _find_stop(pending, params.stop)
        if cut is not None:
            pending, finish = pending[:cut], "stop"
        yield Chunk(pending, ids, finish, Usage(len(prompt_ids), count))

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Token ids of raw text (no template), chat messages (template + generation prompt) or ids."""
        if isinstance(prompt, str):
            return self._check_ids(self._require_tokenizer("a text prompt").encode(prompt))
        if isinstance(prompt, Sequence) and prompt and all(isinstance(m, dict) for m in prompt):
            tok = self._require_tokenizer("chat messages")
            text = tok.apply_chat_template(list(prompt), add_generation_prompt=True)
            return self._check_ids(tok.encode(text, add_special_tokens=False))
        return self._check_ids(prompt)

    @torch.inference_mode()
    def _decode(self, prompt_ids: list[int], params: SamplingParams) -> Generator[int, None, str]:
        """The decode loop: yields new token ids; returns the finish reason ("stop" or "length")."""
        model, n = self.model, len(prompt_ids)
        limit = self.config.max_position_embeddings
        if n >= limit:
            raise ValueError(f"the prompt has {n} tokens; the model's context is {limit}")
        max_new = min(params.max_new_tokens, limit - n)
        cache = KVCache(self.config, 1, n + max_new, self.dtype, self.device)
        generator = torch.Generator()
        if params.seed is not None:
            generator.manual_seed(params.seed)
        else:
            generator.seed()
        sequence = list(prompt_ids)
        logits = self._prefill(sequence, cache)
        while True:
            history = self._tensor(sequence) if params.repetition_penalty != 1.0 else None
            token = sample(logits, params, history, generator)
            if token in self.stop_ids:
                return "stop"
            yield token
            sequence.append(token)
            if len(sequence) - n == max_new:
                return "length"
            if cache.long_rope is False and model.uses_long_rope(len(sequence)):
                logits = self._prefill(sequence, cache)  # the crossing: re-run with the long factors
            else:
                pos = len(sequence) - 1
                logits = model(self._tensor([token])[None], self._tensor([pos]), cache,
                               long_rope=cache.long_rope, last_only=True)[0, -1]

    def _prefill(self, sequence: list[int], cache: KVCache) -> torch.Tensor:
        """Run `sequence` into an empty cache in chunks; logits (V,) of its last token."""
        long = self.model.uses_long_rope(len(sequence))
        for start in range(0, len(sequence), PREFILL_CHUNK):
            chunk = sequence[start:start + PREFILL_CHUNK]
            pos = torch.arange(start, start + len(chunk), device=self.device)
            logits = self.model(self._tensor(chunk)[None], pos, cache, long_rope=long, last_only=True)
        cache.long_rope = long
        return logits[0, -1]

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
