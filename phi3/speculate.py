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

The other drafter is a draft model of the same vocabulary (gpt-fast's and vLLM's draft models,
llama.cpp's `--draft`): any checkpoint `phi3.load` reads, or "layers:N", the target's own first N
layers with its final norm and output layer (no second copy of the weights; LayerSkip's early
exit). It runs on an engine of its own (`DraftRunner`: its own paged KV cache and prefix cache,
the same C decode step), greedily, k tokens for every drafting row of the step at once; each step
it is given the row's sequence so far, and its prefix cache keeps all but the last block's keys.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

MAX_DRAFT = 32  # guessed tokens per row and step a request may ask for
DEFAULT_DRAFT = 5  # guessed tokens per step: "ngram" alone
DEFAULT_NGRAM = 3  # the longest suffix matched
MIN_NGRAM = 2  # the shortest (single tokens match almost anywhere, and mostly guess wrong)
MAX_BACKOFF = 64  # steps a row drafts nothing after repeated misses (see Backoff.missed)
DEFAULT_MODEL_DRAFT = 4  # guessed tokens per step: a draft model
PRIOR_RIGHT = 2.0  # a draft model's row starts as if 2 of 3 guesses were right (ModelDrafter)
DECAY = 0.9  # ... and forgets old drafts at this rate per draft
PROBE_SHARE = 0.03  # a draft model that does not pay is probed again after enough steps that probes cost ~3%
MAX_PAUSE = 1024  # ... at most this many steps
DRAFT_BLOCK = 4  # a draft engine's KV block: each step it recomputes the keys past its last full block


@dataclass(frozen=True)
class Speculation:
    """A request's speculative decoding: `kind` "ngram" (prompt lookup) or "model" (a draft model:
    `draft`, a loaded `LLM`, or its name for `phi3.load`, or "layers:N"), `k` tokens guessed per
    step, `n` the longest suffix looked up (ngram)."""

    kind: str
    k: int = DEFAULT_DRAFT
    n: int = DEFAULT_NGRAM
    draft: object = field(default=None, compare=False)

    def __str__(self) -> str:
        if self.kind == "model":
            name = self.draft if isinstance(self.draft, str) else getattr(self.draft, "name", "") or "model"
            return f"{name}:{self.k}"
        return f"{self.kind}:{self.k}:{self.n}"


USAGE = (f"speculate must be 'ngram', 'ngram:K' (K tokens guessed per step, 1..{MAX_DRAFT}; default {DEFAULT_DRAFT}), "
         f"'ngram:K:N' (N: the longest n-gram matched, 1..8; default {DEFAULT_NGRAM}), a draft model 'MODEL' or "
         f"'MODEL:K' (a checkpoint phi3.load reads, or an LLM; default K {DEFAULT_MODEL_DRAFT}), or 'layers:N' / "
         f"'layers:N:K' (the model's own first N layers as the draft)")


def parse(spec) -> Speculation | None:
    """"ngram[:K[:N]]", "MODEL[:K]", "layers:N[:K]" or a loaded `LLM` -> a `Speculation` (None or "" or
    "off": none); a ValueError that says what is accepted otherwise. A model's name is checked when
    it is loaded (`LLM.generate`, `phi3 serve`), not here."""
    if spec is None or spec == "" or spec == "off":
        return None
    if isinstance(spec, Speculation):
        return spec
    if hasattr(spec, "model") and hasattr(spec, "config"):  # a loaded LLM
        return Speculation("model", DEFAULT_MODEL_DRAFT, draft=spec)
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"{USAGE}, got {spec!r}")
    kind, *numbers = spec.strip().split(":")
    if kind == "ngram":
        if len(numbers) > 2 or not all(x.strip().isdigit() for x in numbers):
            raise ValueError(f"{USAGE}, got {spec!r}")
        k, n = (int(x) for x in numbers + [str(DEFAULT_DRAFT), str(DEFAULT_NGRAM)][len(numbers):])
        if not 1 <= k <= MAX_DRAFT or not 1 <= n <= 8:
            raise ValueError(f"{USAGE}, got {spec!r}")
        return Speculation(kind, k, n)
    if kind == "layers":
        if not 1 <= len(numbers) <= 2 or not all(x.strip().isdigit() for x in numbers) or int(numbers[0]) < 1:
            raise ValueError(f"{USAGE}, got {spec!r}")
        k = int(numbers[1]) if len(numbers) == 2 else DEFAULT_MODEL_DRAFT
        draft = f"layers:{int(numbers[0])}"
    else:  # a model's name, with ":K" after it where the last part is a number
        name, _, tail = spec.strip().rpartition(":")
        draft, k = (name, int(tail)) if name and tail.isdigit() else (spec.strip(), DEFAULT_MODEL_DRAFT)
    if not 1 <= k <= MAX_DRAFT:
        raise ValueError(f"{USAGE}, got {spec!r}")
    return Speculation("model", k, draft=draft)


class Backoff:
    """A row's drafting back-off: after a draft with nothing accepted it drafts nothing for 1, 2, 4,
    ... `MAX_BACKOFF` steps (reset by a hit), so text that the drafter rarely guesses pays for few
    wasted verify steps."""

    def __init__(self, spec: Speculation):
        self.spec = spec
        self.skip = self.backoff = 0

    def wants_draft(self) -> bool:
        """False while backing off (and counts the step)."""
        if self.skip:
            self.skip -= 1
            return False
        return True

    def missed(self, accepted: int, drafted: int) -> None:
        """After a verify with a draft: `accepted` of its `drafted` tokens were right."""
        if accepted:
            self.backoff = self.skip = 0
        else:
            self.pause()

    def pause(self) -> None:
        """Draft nothing for the next 1, 2, 4, ... MAX_BACKOFF steps (doubling at each call)."""
        self.backoff = min(MAX_BACKOFF, max(1, 2 * self.backoff))
        self.skip = self.backoff


class Drafter(Backoff):
    """Prompt lookup over one growing sequence: for each n-gram (n = 1..N) where it last occurred
    with a token after it. `propose` is a dictionary lookup per n; `extend` costs N entries per new
    token."""

    def __init__(self, spec: Speculation):
        super().__init__(spec)
        self.seq: list[int] = []
        self.after: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token that followed its latest occurrence

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


class ModelDrafter(Backoff):
    """A row's drafting by a draft model: its back-off, the `DraftRunner` that guesses for it, and
    how often its guesses are right (`expected`)."""

    def __init__(self, spec: Speculation, runner: DraftRunner):
        super().__init__(spec)
        self.runner = runner
        # guesses right, and drafts ended by a wrong one (decaying): the draft's record on other rows so far
        self.right, self.wrong = runner.right, runner.wrong
        self.probe = False  # back from a pause: draft once whatever the estimate, to renew it

    def missed(self, accepted: int, drafted: int) -> None:
        for record in (self, self.runner):  # this row's, and the draft's over all rows (new rows start from it)
            record.right = DECAY * record.right + accepted
            record.wrong = DECAY * record.wrong + (accepted < drafted)
        if self.probe:  # the pause goes on growing until the estimate says the draft pays
            self.probe = False
        else:
            super().missed(accepted, drafted)

    def pause(self, steps: int = 0) -> None:
        """Draft nothing for the next max(doubling back-off, `steps`) steps, then draft once (a probe)."""
        super().pause()
        self.skip = self.backoff = max(self.backoff, min(steps, MAX_PAUSE))
        self.probe = True

    def expected(self, k: int) -> float:
        """Tokens one verify step of k guesses is expected to give this row: 1 + a + ... + a^k, a the
        rate at which its guesses have been right."""
        a = self.right / (self.right + self.wrong)
        return sum(a ** i for i in range(k + 1))


def layer_slice(model, layers: int):
    """The first `layers` decoder layers of `model` (a `Phi3`) with its embedding, final norm and
    output layer, as a `Phi3` of that depth sharing the modules (no copy of any weight)."""
    from dataclasses import replace

    import torch

    from .model import Phi3

    total = model.config.num_hidden_layers
    if not 1 <= layers < total:
        raise ValueError(f"a draft of the model's own first N layers needs 1 <= N < {total} (its depth), got {layers}")
    config = replace(model.config, num_hidden_layers=layers)
    with torch.device("meta"):
        draft = Phi3(config)
    draft.model.embed_tokens, draft.model.norm, draft.lm_head = model.model.embed_tokens, model.model.norm, model.lm_head
    draft.model.layers = torch.nn.ModuleList(model.model.layers[:layers])
    draft.rope = model.rope
    return draft


def check_vocabulary(target, draft, target_tokenizer=None, draft_tokenizer=None, name: str = "the draft model") -> None:
    """A ValueError unless `draft` (a `Phi3`) guesses in `target`'s token ids: the same output size and,
    where both have tokenizers, the same token for every id."""
    v, w = target.config.vocab_size, draft.config.vocab_size
    if v != w:
        raise ValueError(f"{name} has a vocabulary of {w} tokens, the model {v}: a draft model must share "
                         f"the model's tokenizer")
    if target_tokenizer is not None and draft_tokenizer is not None and target_tokenizer is not draft_tokenizer:
        for i in range(v):
            if target_tokenizer.id_to_token(i) != draft_tokenizer.id_to_token(i):
                raise ValueError(f"{name}'s tokenizer differs from the model's (id {i}: "
                                 f"{draft_tokenizer.id_to_token(i)!r}, not {target_tokenizer.id_to_token(i)!r}): "
                                 f"a draft model must share the model's tokenizer")


class DraftRunner:
    """A draft model's own engine (its paged KV cache and prefix cache; the C decode step where it
    applies), as many rows as the target engine. `propose` drafts for several rows at once: each
    row's sequence is queued as a greedy request of k tokens, and the draft engine steps until all
    are done; its prefix cache holds the keys of every full block seen before, so a row's next
    step prefills only its last block and the tokens accepted since."""

    def __init__(self, draft, target_engine, name: str = "the draft model"):
        from .engine import Engine

        self.name = name
        slots = target_engine.slots
        max_len = min(target_engine.max_len + MAX_DRAFT + 1, draft.config.max_position_embeddings)
        tokens = target_engine.cache.tokens + slots * (MAX_DRAFT + 1)  # the target's pool, and every row's draft
        try:  # the engine checks its pool against free memory before allocating it
            self.engine = Engine(draft, slots=slots, max_len=max_len, kv_cache_tokens=tokens, prefix_cache=True,
                                 block_size=DRAFT_BLOCK)
        except ValueError as e:
            raise ValueError(f"{name} does not fit: {e}") from None
        self.steps = 0  # draft engine steps run
        self.seconds: float | None = None  # a `propose` call's wall time (moving average)
        self.right, self.wrong = PRIOR_RIGHT, 1.0  # its guesses right, and drafts ended by a wrong one (decaying)

    def propose(self, work: list[tuple[list[int], int]]) -> list[list[int]]:
        """(sequence, k) per row -> up to k greedy tokens of the draft model after each sequence
        (none where the sequence is past the draft's context)."""
        from .sampling import SamplingParams

        engine, out, start = self.engine, [[] for _ in work], time.perf_counter()
        requests = {}
        for i, (seq, k) in enumerate(work):
            if len(seq) + 1 < engine.context:
                requests[i] = engine.submit(seq, SamplingParams(max_new_tokens=k))
        while engine.busy:
            engine.step()
            self.steps += 1
        for i, req in requests.items():
            out[i] = req.tokens[:work[i][1]]
        self.seconds = moving_average(self.seconds, time.perf_counter() - start)
        return out


def moving_average(average: float | None, value: float) -> float:
    return value if average is None else 0.8 * average + 0.2 * value


def draft_pays(drafters: list[ModelDrafter], k: int, runner: DraftRunner, step: float | None,
               verify: float | None) -> bool:
    """Whether a verify step after drafting k tokens for these rows is expected to decode them faster
    than plain steps: their expected tokens per verify, at a plain step's time `step` each, against a
    verify step's time plus the draft's. Yes until there are times to compare (a plain step's time
    is taken to be a verify step's until one is seen), and for a row back from a pause (a probe)."""
    step, verify = _step_times(step, verify)
    if runner.seconds is None or step is None or any(d.probe for d in drafters):
        return True
    gain = sum(d.expected(k) for d in drafters) / len(drafters)
    return gain * step > verify + runner.seconds


def probe_pause(runner: DraftRunner, step: float | None, verify: float | None) -> int:
    """Steps to draft nothing after a draft judged not to pay: enough that the next probe (a draft and
    a verify step) costs about PROBE_SHARE of the plain steps' time in between."""
    step, verify = _step_times(step, verify)
    if runner.seconds is None or not step:
        return 0
    return math.ceil((runner.seconds + verify) / (PROBE_SHARE * step))


def _step_times(step: float | None, verify: float | None) -> tuple[float | None, float | None]:
    """(plain step, verify step) seconds, each standing in for the other until it has been seen."""
    return (step if step is not None else verify), (verify if verify is not None else step)
