"""The log-probabilities of a served answer's tokens, placed in the answer's text.

The engine reports, for each token it emits, the token's log-probability under the model and the
most likely alternatives (`Event.logprob`). The server shows each token as OpenAI does:
- `bytes`: the bytes the token writes into the answer where it stands (`Tokenizer.token_bytes`):
  joined, they are the answer's UTF-8. A byte token (`<0xE2>`) gives its raw byte. A special token
  writes nothing (the answer skips it): None.
- `text`: those bytes as text, with bytes that are not a whole character written `\\xNN` (so a
  three-byte character split over byte tokens reads `\\xe2`, `\\x80`, `\\x9c`); a special token, its
  name (`<|end|>`). Alternatives are shown where the chosen token stands.
- `offset`: where the token's text begins in the answer: the characters the tokens before it decode
  to, as far as they agree with the answer (so a token inside a character counts the characters
  completed before it).

Which tokens go with which piece of text: a streamed chunk carries the tokens whose text begins in
it; the last chunk, the tokens left (special ones included). When a stop string cuts the answer,
the tokens that begin before the cut are reported (the last may run into the stop string: its text
is in the answer in part) and the ones after it are not.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .generate import Chunk


@dataclass
class Alternative:
    text: str
    bytes: bytes | None
    logprob: float


@dataclass
class TokenLogprob:
    text: str
    bytes: bytes | None
    logprob: float
    top: list[Alternative]  # the most likely tokens at its position, most likely first
    offset: int  # characters of the answer before it


class TokenTexts:
    """(token id, first in the answer) -> (text, bytes) for one tokenizer, remembered: the server shows
    the same few thousand tokens again and again."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._known: dict[tuple[int, bool], tuple[str, bytes | None]] = {}

    def __call__(self, token: int, first: bool) -> tuple[str, bytes | None]:
        known = self._known.get((token, first))
        if known is None:
            data = self.tokenizer.token_bytes(token, first)
            text = self.tokenizer.decode([token]) if data is None else data.decode("utf-8", errors="backslashreplace")
            known = self._known[(token, first)] = (text, data)
        return known


class AnswerLogprobs:
    """One answer's tokens with their log-probabilities, placed in its text as it is decoded (with
    the decoder `TextStream` uses, so the text is the answer's before any stop string cuts it)."""

    def __init__(self, texts: TokenTexts):
        self.texts = texts
        self.decoder = texts.tokenizer.decoder(skip_special_tokens=True)
        self.tokens: list[TokenLogprob] = []
        self.ids: list[int] = []
        self.written = 0  # characters of the answer's text final so far (before any stop string cuts it)
        self.first = True  # no token has stood in the text yet (only special ones, if any)
        self.window = 0  # the first token whose text is not final yet
        self.given = 0  # tokens handed out with chunks
        self.delivered = 0  # characters of the answer handed out

    def push(self, token: int, logprob: tuple[float, list[tuple[int, float]]]) -> None:
        """Add the next token of the answer with the engine's (logprob, [(id, logprob), ...])."""
        chosen, alternatives = logprob
        text, data = self.texts(token, self.first)
        top = [Alternative(*self.texts(i, self.first), _finite(lp)) for i, lp in alternatives]
        self.tokens.append(TokenLogprob(text, data, _finite(chosen), top, self.written))
        self.ids.append(token)
        self.first = self.first and data is None
        self._place(self.decoder.step(token))

    def entries(self, chunk: Chunk) -> list[TokenLogprob]:
        """The tokens that go with `chunk`, the next piece of the answer (see the module docstring)."""
        self.delivered += len(chunk.text)
        if chunk.finish_reason is not None:
            self._place(self.decoder.flush())
            if self.written == self.delivered:  # not cut by a stop string: every token left
                out, self.given = self.tokens[self.given:], len(self.tokens)
                return out
        end = self.given
        while end < len(self.tokens) and self.tokens[end].offset < self.delivered:
            end += 1
        out, self.given = self.tokens[self.given:end], end
        return out

    def _place(self, text: str) -> None:
        """The tokens since the window began have written `text`: give each its offset."""
        if not text:
            return
        start, window = self.written, self.tokens[self.window:]
        if b"".join(t.bytes or b"" for t in window) == text.encode():
            before = b""
            for t in window:  # whole characters before it (a prefix of valid UTF-8 only ends early)
                t.offset = start + len(before.decode("utf-8", errors="ignore"))
                before += t.bytes or b""
        else:  # bytes that are not UTF-8 (U+FFFD in the text): ask the decoder (rare, so a full decode)
            for j, t in enumerate(window, self.window):
                prefix = self.texts.tokenizer.decode(self.ids[:j], skip_special_tokens=True)
                t.offset = start + len(os.path.commonprefix([prefix[start:], text]))
        self.written += len(text)
        self.window = len(self.tokens)


def _finite(logprob: float) -> float:
    """OpenAI's -9999.0 for a probability that underflowed (JSON has no -Infinity)."""
    return max(logprob, -9999.0)
