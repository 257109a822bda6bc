"""Speculative decoding: guess a row's next tokens on the host, check them all in one forward.

A decoding row normally feeds its last token and draws one more. With a draft of k guessed tokens
it feeds the last token and the k guesses (k + 1 positions of the same row in one forward: the
engine's verify step), draws a token at each position exactly as plain decoding would (the same
processors, the same seeded noise at the same step), and keeps the drawn tokens up to the first
one that differs from its guess, that one included: 1 to k + 1 tokens for one read of the weights.

Why the output is the plain one: position i's logits are the model's given the tokens before it,
which, up to the first mismatch, are the tokens plain decoding would have drawn; the draw there is
the same function of those logits and of (seed, step) (sampling.py), so it is the same token.
A greedy row is the usual argmax check. A sampled row keeps the target distribution: a draft is a
point guess, so checking it against the target's own draw accepts it with probability p(guess),
which is what rejection sampling (accept with min(1, p/q), q = 1) gives; and a seeded row draws
the same tokens with speculation and without.

The drafter here is prompt lookup (transformers' `prompt_lookup_num_tokens`, vLLM's "ngram"): the
tokens that followed the latest earlier occurrence of the row's last n tokens, in its prompt or its
own output (n from N down to 2). It costs a dictionary lookup per step and pays where the answer
quotes its input: retrieval answers, summaries, code edits, JSON that repeats keys.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_DRAFT = 32  # guessed tokens per row and step a request may ask for
DEFAULT_DRAFT = 5  # guessed tokens per step: "ngram" alone
DEFAULT_NGRAM = 3  # the longest suffix matched
MIN_NGRAM = 2  # the shortest (single tokens match almost anywhere, and mostly guess wrong)
MAX_BACKOFF = 64  # steps a row drafts nothing after repeated misses (see Drafter.missed)


@dataclass(frozen=True)
class Speculation:
    """A request's speculative decoding: `kind` "ngram" (prompt lookup), `k` tokens guessed per
    step, `n` the longest suffix looked up."""

    kind: str
    k: int = DEFAULT_DRAFT
    n: int = DEFAULT_NGRAM

    def __str__(self) -> str:
        return f"{self.kind}:{self.k}:{self.n}"


def parse(spec) -> Speculation | None:
    """"ngram", "ngram:K" or "ngram:K:N" -> a `Speculation` (None or "" or "off": none); a
    ValueError that says what is accepted otherwise."""
    if spec is None or spec == "" or spec == "off":
        return None
    if isinstance(spec, Speculation):
        return spec
    usage = (f"speculate must be 'ngram', 'ngram:K' (K tokens guessed per step, 1..{MAX_DRAFT}; default "
             f"{DEFAULT_DRAFT}) or 'ngram:K:N' (N: the longest n-gram matched, 1..8; default {DEFAULT_NGRAM})")
    if not isinstance(spec, str):
        raise ValueError(f"{usage}, got {spec!r}")
    kind, *numbers = spec.strip().split(":")
    if kind != "ngram" or len(numbers) > 2 or not all(x.strip().isdigit() for x in numbers):
        raise ValueError(f"{usage}, got {spec!r}")
    k, n = (int(x) for x in numbers + [str(DEFAULT_DRAFT), str(DEFAULT_NGRAM)][len(numbers):])
    if not 1 <= k <= MAX_DRAFT or not 1 <= n <= 8:
        raise ValueError(f"{usage}, got {spec!r}")
    return Speculation(kind, k, n)


class Drafter:
    """Prompt lookup over one growing sequence: for each n-gram (n = 1..N) where it last occurred
    with a token after it. `propose` is a dictionary lookup per n; `extend` costs N entries per new
    token. Also the row's back-off: after a draft with nothing accepted it drafts nothing for
    1, 2, 4, ... `MAX_BACKOFF` steps (reset by a hit), so free text that rarely repeats pays for
    few wasted verify steps."""

    def __init__(self, spec: Speculation):
        self.spec = spec
        self.seq: list[int] = []
        self.after: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token that followed its latest occurrence
        self.skip = self.backoff = 0

    def extend(self, ids) -> None:
        seq, after, n = self.seq, self.after, self.spec.n
        for token in ids:
            i = len(seq)  # `token` is followed by nothing yet; the n-grams ending before it are followed by it
            for m in range(1, min(n, i) + 1):
                after[tuple(seq[i - m:i])] = i
            seq.append(token)

    def propose(self, k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest matching suffix."""
        seq = self.seq
        for m in range(min(self.spec.n, len(seq)), min(MIN_NGRAM, self.spec.n) - 1, -1):
            start = self.after.get(tuple(seq[len(seq) - m:]))
            if start is not None:
                return seq[start:start + k]
        return []

    def wants_draft(self) -> bool:
        """False while backing off (and counts the step)."""
        if self.skip:
            self.skip -= 1
            return False
        return True

    def missed(self, accepted: int) -> None:
        """After a verify with a draft: `accepted` of its tokens were right."""
        self.backoff = 0 if accepted else min(MAX_BACKOFF, max(1, 2 * self.backoff))
        self.skip = self.backoff
