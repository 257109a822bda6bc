"""Structured output: the token grammar of a request (a JSON schema, a regex, a choice of strings or an
EBNF/GBNF/Lark grammar), compiled by llguidance, and the per-request matcher that says which tokens may
come next.

    SamplingParams(json_schema=...) ─► grammar_text(): llguidance's grammar, validated (cached per text)
    Engine.submit ─► matcher_for(): a `Matcher` (a copy of one compiled matcher per grammar and vocabulary)
    each step: Matcher.fill_mask(row) ─► RowParams' bitmask ─► -inf on the logits of banned tokens
    each token: Matcher.advance(token) ─► True once the grammar is complete: the request ends ("stop")

llguidance (llama.cpp's and vLLM's guidance backend) was measured against xgrammar (vLLM's and
SGLang's) before choosing: bench/grammar_backends.py, docs/PERFORMANCE.md. Its masks cost tens of
microseconds per token on our vocabularies, and it brings no dependency (xgrammar needs transformers).

JSON is compact, as Python's `json.dumps` writes it (", " and ": ", no other whitespace): a small
model left free to choose whitespace can write newlines until its budget runs out.
"""

from __future__ import annotations

import json
import threading
import weakref
from functools import lru_cache

import numpy as np
import torch

KINDS = ("json_schema", "regex", "choice", "grammar")  # SamplingParams' fields, at most one per request
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _llguidance():
    try:
        import llguidance
    except ImportError as e:  # a dependency: only a broken install gets here
        raise ValueError("structured output needs the llguidance package (pip install llguidance)") from e
    return llguidance


def schema_text(schema) -> str:
    """A JSON schema given as a dict, a JSON string or a pydantic model class -> its JSON text."""
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):  # a pydantic model class
        schema = schema.model_json_schema()
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"json_schema is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise ValueError(f"json_schema must be a JSON object (a dict, its JSON text or a pydantic model class), "
                         f"got {type(schema).__name__}")
    try:
        return json.dumps(schema, ensure_ascii=False)  # key order kept: it is the order of the answer
    except (TypeError, ValueError) as e:
        raise ValueError(f"json_schema is not JSON: {e}") from None


@lru_cache(maxsize=256)
def grammar_text(kind: str, spec: str | tuple[str, ...]) -> str:
    """llguidance's grammar for one request's constraint (`kind` one of KINDS; a schema as JSON text,
    a choice as a tuple of strings). Raises ValueError naming what is wrong with it."""
    ll = _llguidance()
    try:
        if kind == "json_schema":
            grammar = ll.LLMatcher.grammar_from_json_schema(spec, overrides=JSON_OPTIONS)
        elif kind == "regex":
            grammar = ll.LLMatcher.grammar_from_regex(spec)
        elif kind == "choice":
            grammar = ll.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec))
        else:  # EBNF/GBNF (llama.cpp's) or Lark (llguidance's own)
            grammar = ll.grammar_from("grammar", spec)
    except ValueError as e:
        raise ValueError(f"invalid {kind}: {e}") from None
    error = ll.LLMatcher.validate_grammar(grammar)
    if error:
        raise ValueError(f"invalid {kind}: {error.strip()}")
    return grammar


def check(kind: str, value) -> str | tuple[str, ...]:
    """A constraint as SamplingParams keeps it (hashable, canonical); raises ValueError when invalid."""
    if kind == "json_schema":
        value = schema_text(value)
    elif kind == "choice":
        if isinstance(value, str) or not all(isinstance(c, str) for c in value) or not value:
            raise ValueError(f"choice must be a non-empty list of strings, got {value!r}")
        value = tuple(value)
        if any(not c for c in value):
            raise ValueError("choice strings must not be empty")
    elif not isinstance(value, str) or not value:
        raise ValueError(f"{kind} must be a non-empty string, got {value!r}")
    grammar_text(kind, value)
    return value


# -- the vocabulary side ---------------------------------------------------------------------------
_vocabularies: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {vocab size: LLTokenizer}
_compiled: dict[tuple[int, str], object] = {}  # (id of LLTokenizer, grammar) -> pristine LLMatcher
_lock = threading.Lock()
MAX_COMPILED = 256  # grammars kept compiled (the oldest is dropped past it)


def _vocabulary(tokenizer, vocab_size: int):
    """llguidance's view of `tokenizer` over the model's `vocab_size` ids (built once: ~0.3 s)."""
    with _lock:
        per_size = _vocabularies.setdefault(tokenizer, {})
        if vocab_size not in per_size:
            per_size[vocab_size] = _llguidance().LLTokenizer(
                tokenizer._backend.to_str(), n_vocab=vocab_size, eos_token=sorted(tokenizer.stop_ids) or None)
        return per_size[vocab_size]


def matcher_for(params, tokenizer, vocab_size: int, stop_ids) -> Matcher | None:
    """The matcher for a request's constraint, or None when it has none."""
    if params.constraint is None:
        return None
    if tokenizer is None:
        raise ValueError("structured output needs a tokenizer, and this model was loaded without one")
    kind, spec = params.constraint
    vocabulary = _vocabulary(tokenizer, vocab_size)
    grammar = grammar_text(kind, spec)
    key = (id(vocabulary), grammar)
    with _lock:
        pristine = _compiled.get(key)
    if pristine is None:
        pristine = _llguidance().LLMatcher(vocabulary, grammar, log_level=0)
        if pristine.is_error():
            raise ValueError(f"invalid {kind}: {pristine.get_error().strip()}")
        with _lock:
            if len(_compiled) >= MAX_COMPILED:
                _compiled.pop(next(iter(_compiled)))
            _compiled[key] = pristine
    return Matcher(pristine.deep_copy(), vocabulary, stop_ids)


class Matcher:
    """One request's position in its grammar. `fill_mask` before each draw, `advance` after it.

    The request's stop ids are allowed exactly where the grammar may end (llguidance's own end
    tokens, the tokenizer's, are not stop ids of a request that ignores them)."""

    def __init__(self, matcher, vocabulary, stop_ids):
        self._m = matcher
        self.stop_ids = sorted(stop_ids)
        self._ends = sorted(set(vocabulary.eos_tokens) | set(stop_ids))  # the ids whose bit we decide
        self.done = False
        self.error: str | None = None  # why the grammar could not take a token (never for a masked draw)

    def fill_mask(self, row: torch.Tensor) -> None:
        """Write the allowed next tokens into `row`, a contiguous CPU int32 bitmask (vocab / 32 words)."""
        self._m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)
        words = row.numpy().view(np.uint32)
        may_end = self._m.is_accepting()
        for i in self._ends:
            word, bit = divmod(i, 32)
            if word < len(words):
                if may_end and i in self.stop_ids:
                    words[word] |= np.uint32(1 << bit)
                else:
                    words[word] &= np.uint32(~(1 << bit) & 0xFFFFFFFF)
        if not words.any():  # nothing may follow: a dead end (never for a grammar that can complete)
            self.done = True

    def advance(self, token: int) -> bool:
        """Take the drawn token; True when the answer is complete (or the grammar cannot go on)."""
        if not self._m.consume_token(token) or self._m.is_error():
            self.done, self.error = True, self._m.get_error() or f"token {token} is not allowed here"
        elif self._m.is_stopped():
            self.done = True
        return self.done

    def is_done(self) -> bool:
        return self.done

    def is_accepting(self) -> bool:
        """Whether the text so far is a complete answer (the grammar may end here)."""
        return self._m.is_accepting()
