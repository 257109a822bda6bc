"""`SamplingParams` (validated) and sampling: a pure function of logits and per-row parameters.

Order of the logits processors, as transformers applies them: repetition penalty (over prompt
and generated ids), then temperature, top-k, top-p, min-p; then argmax (temperature 0) or a
draw from the softmax.

Everything runs on the logits' device for a whole batch at once, each row with its own
parameters (tensors indexed by row, never a Python branch per row), so a decode step can be
captured in a CUDA graph. The draw is the Gumbel-max trick, argmax(logits + Gumbel noise), with
the noise a pure function of (row's seed, row's step, token id) through a counter-based hash:
a row's seed gives the same tokens whatever else shares the batch, on any device.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from . import grammar
from .speculate import parse as parse_speculation

MAX_LOGPROBS = 20  # alternatives per token a request may ask for (OpenAI's top_logprobs limit)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)  # strings that end the text (not included)
    logprobs: int | None = None  # report each new token's log-probability and this many alternatives
    # Structured output (phi3.grammar), at most one: the answer is guaranteed to match, unless
    # max_new_tokens cuts it (finish_reason "length"). A schema is kept as its JSON text.
    json_schema: object = None  # a dict, its JSON text, or a pydantic model class
    regex: str | None = None
    choice: tuple[str, ...] | None = None  # one of these strings, exactly
    grammar: str | None = None  # EBNF/GBNF (llama.cpp's) or Lark
    # Speculative decoding (phi3.speculate): "ngram", "ngram:K" or "ngram:K:N" guesses K tokens a step by
    # prompt lookup; a draft model ("MODEL[:K]" for phi3.load, a loaded LLM, or "layers:N[:K]", the
    # model's own first N layers) guesses them greedily; each step checks them in one forward. The
    # tokens are the same as without it.
    speculate: object = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is None:
            object.__setattr__(self, "stop", ())
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        _check_int("max_new_tokens", self.max_new_tokens, lo=1)
        _check_float("temperature", self.temperature, lo=0.0, hi=100.0)
        _check_float("top_p", self.top_p, lo=0.0, hi=1.0, lo_open=True)
        _check_int("top_k", self.top_k, lo=0)
        _check_float("min_p", self.min_p, lo=0.0, hi=1.0)
        _check_float("repetition_penalty", self.repetition_penalty, lo=0.0, hi=100.0, lo_open=True)
        if self.seed is not None:
            _check_int("seed", self.seed, lo=0)
            if self.seed >= 2**63:
                raise ValueError(f"seed must be below 2**63, got {self.seed}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must be non-empty strings, got {s!r}")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, lo=0)
            if self.logprobs > MAX_LOGPROBS:
                raise ValueError(f"logprobs must be at most {MAX_LOGPROBS}, got {self.logprobs}")
        if parse_speculation(self.speculate) is None:
            object.__setattr__(self, "speculate", None)
        given = [kind for kind in grammar.KINDS if getattr(self, kind) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of json_schema, regex, choice and grammar, got {', '.join(given)}")
        for kind in given:
            object.__setattr__(self, kind, grammar.check(kind, getattr(self, kind)))

    @property
    def constraint(self) -> tuple[str, str | tuple[str, ...]] | None:
        """(kind, spec) of the structured-output constraint (kind one of phi3.grammar.KINDS), or None."""
        for kind in grammar.KINDS:
            if getattr(self, kind) is not None:
                return kind, getattr(self, kind)
        return None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _check_int(name, value, lo):
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")


def _check_float(name, value, lo, hi, lo_open=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    if not ok or value > hi or value < lo or (lo_open and value == lo):
        bound = f"in ({lo}, {hi}]" if lo_open else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be a number {bound}, got {value!r}")


def random_seed() -> int:
    """A fresh seed for a request that did not set one."""
    return random.SystemRandom().randrange(2**62)


# -- per-row parameters as tensors -----------------------------------------------------------------
class Mode(NamedTuple):
    """Which stages a batch needs (each captured step is specialised on it, so a greedy batch
    pays for an argmax only)."""

    penalty: bool  # some row has repetition_penalty != 1
    sample: bool  # some row has temperature > 0
    sort: bool  # some sampling row has top_k or top_p < 1
    logprobs: bool = False  # some row reports log-probabilities
    grammar: bool = False  # some row has a structured-output constraint: its token mask is applied


class RowParams:
    """Sampling parameters of `rows` sequences as device tensors, row i = slot i; plus each row's
    seed, step counter (tokens drawn so far) and the set of token ids it has seen (prompt and
    generated), for the repetition penalty. Column `vocab` of `seen` takes writes of inactive rows."""

    def __init__(self, rows: int, vocab: int, device=None):
        self.vocab = vocab
        self.temperature = torch.zeros(rows, device=device)
        self.top_p = torch.ones(rows, device=device)
        self.top_k = torch.zeros(rows, dtype=torch.long, device=device)
        self.min_p = torch.zeros(rows, device=device)
        self.penalty = torch.ones(rows, device=device)
        self.seed = torch.zeros(rows, dtype=torch.long, device=device)
        self.step = torch.zeros(rows, dtype=torch.long, device=device)
        self.seen = torch.zeros(rows, vocab + 1, dtype=torch.bool, device=device)  # (rows, V + 1)
        self.modes: list[Mode] = [Mode(False, False, False, False)] * rows  # host copy, per row
        # Structured output: allowed tokens per row as a bitmask (bit i of word w: token 32 w + i),
        # all ones for a row without a constraint; filled on the host (`host_mask`), copied before a step.
        words = (vocab + 31) // 32
        self.mask = torch.full((rows, words), -1, dtype=torch.int32, device=device)  # (rows, V / 32)
        on_cpu = self.mask.device.type == "cpu"
        self.host_mask = self.mask if on_cpu else torch.full((rows, words), -1, dtype=torch.int32, pin_memory=True)
        self._bits = _BITS.to(self.mask.device)

    def set(self, row: int, params: SamplingParams, seed: int, history: list[int] | torch.Tensor,
            step: int = 0) -> None:
        """Give `row` a request's parameters, its seed, its step (tokens drawn so far: 0, or more for a
        request that resumes), and the ids seen so far."""
        for name, value in (("temperature", params.temperature), ("top_p", params.top_p), ("top_k", params.top_k),
                            ("min_p", params.min_p), ("penalty", params.repetition_penalty), ("seed", seed),
                            ("step", step)):
            getattr(self, name)[row] = value
        self.seen[row] = False
        if params.repetition_penalty != 1.0:
            ids = torch.as_tensor(history, dtype=torch.long).to(self.seen.device)
            self.seen[row, ids] = True
        sampling = not params.greedy
        self.modes[row] = Mode(params.repetition_penalty != 1.0, sampling,
                               sampling and (params.top_k > 0 or params.top_p < 1.0), params.logprobs is not None,
                               params.constraint is not None)
        self.host_mask[row] = self.mask[row] = -1  # no constraint until fill_masks says otherwise

    def fill_masks(self, matchers: dict) -> None:
        """Write each constrained row's allowed tokens ({row: phi3.grammar.Matcher}) and send the
        rows up to the highest to the device (outside any captured step)."""
        for row, matcher in matchers.items():
            matcher.fill_mask(self.host_mask[row])
        if self.host_mask is not self.mask and matchers:
            end = max(matchers) + 1
            self.mask[:end].copy_(self.host_mask[:end], non_blocking=True)

    def mode(self, rows) -> Mode:
        """The stages needed by `rows` (host-side: no device sync)."""
        modes = [self.modes[r] for r in rows]
        return Mode(*(any(m[i] for m in modes) for i in range(len(Mode._fields))))

    def sample(self, logits: torch.Tensor, first: int, mode: Mode) -> torch.Tensor:
        """Next ids (B,) for rows first..first+B-1 from their logits (B, V)."""
        end = first + logits.shape[0]
        if mode.grammar:
            logits = apply_mask(logits, self.mask[first:end], self._bits)
        return sample_rows(logits, self.temperature[first:end], self.top_k[first:end], self.top_p[first:end],
                           self.min_p[first:end], self.penalty[first:end], self.seen[first:end, :self.vocab],
                           self.seed[first:end], self.step[first:end], mode)

    def sample_at(self, logits: torch.Tensor, rows: torch.Tensor, ahead: torch.Tensor, mode: Mode,
                  guessed: torch.Tensor | None = None) -> torch.Tensor:
        """A verify step's draws (N,) from logits (N, V) at N positions of the rows `rows` (N,), each
        `ahead` (N,) draws after its row's next one: drawn as that row would draw it then, with the
        noise of step + ahead and, for the penalty, also the ids `guessed` (N, G) before it (the
        vocabulary size where none) seen. Rows' state is not changed."""
        if mode.grammar:
            logits = apply_mask(logits, self.mask[rows], self._bits)
        seen = self.seen[rows]  # (N, V + 1)
        if mode.penalty and guessed is not None:
            seen = seen.scatter(1, guessed, True)
        return sample_rows(logits, self.temperature[rows], self.top_k[rows], self.top_p[rows], self.min_p[rows],
                           self.penalty[rows], seen[:, :self.vocab], self.seed[rows], self.step[rows] + ahead, mode)

    def advance(self, first: int, tokens: torch.Tensor, active: torch.Tensor) -> None:
        """After a draw: active rows count the step and remember the new id (in place, capturable)."""
        end = first + tokens.shape[0]
        self.step[first:end] += active
        self.seen[first:end].scatter_(1, torch.where(active, tokens, self.vocab)[:, None], True)


# -- the pure functions ----------------------------------------------------------------------------
_BITS = (torch.arange(256)[:, None] >> torch.arange(8)) & 1 == 1  # (256, 8): the bits of each byte value


def apply_mask(logits: torch.Tensor, mask: torch.Tensor, bits: torch.Tensor = _BITS) -> torch.Tensor:
    """logits (B, V), int32 bitmask (B, ceil(V / 32)) -> fp32 logits with the banned tokens at -inf.
    The words' little-endian bytes are looked up in a byte -> 8 bits table: one gather, no branches."""
    allowed = bits[mask.view(torch.uint8).long()].reshape(mask.shape[0], -1)[:, :logits.shape[-1]]  # (B, V)
    return logits.float().masked_fill(~allowed, float("-inf"))


def logprobs_of(logits: torch.Tensor, ids: torch.Tensor, k: int = MAX_LOGPROBS):
    """The model's log-probabilities (B, V) -> those of ids (B,), and the k most likely (B, k) values and ids."""
    logp = logits.float().log_softmax(-1)
    top = logp.topk(k, dim=-1)
    return logp.gather(1, ids[:, None])[:, 0], top.values, top.indices


def process_rows(logits, temperature, top_k, top_p, min_p, penalty, seen, mode: Mode) -> torch.Tensor:
    """logits (B, V) fp32 -> processed logits (B, V); each parameter (B,); `seen` (B, V) bool.

    Filtered entries are -inf. Greedy rows (temperature 0) get only the repetition penalty.
    """
    if mode.penalty:
        penalised = torch.where(logits < 0, logits * penalty[:, None], logits / penalty[:, None])
        logits = torch.where(seen & (penalty != 1.0)[:, None], penalised, logits)
    if not mode.sample:
        return logits
    greedy = (temperature == 0.0)[:, None]
    scaled = logits / torch.where(greedy[:, 0], 1.0, temperature)[:, None]
    if mode.sort:
        desc = torch.sort(scaled, dim=-1, descending=True).values
        kth = desc.gather(1, (top_k.clamp(1, scaled.shape[-1]) - 1)[:, None])  # (B, 1)
        scaled = scaled.masked_fill((top_k > 0)[:, None] & (scaled < kth), float("-inf"))
        asc, order = torch.sort(scaled, dim=-1, descending=False)
        drop = asc.softmax(-1).cumsum(-1) <= (1 - top_p)[:, None]
        drop[:, -1] = False  # always keep the most likely token
        drop &= (top_p < 1.0)[:, None]
        scaled = scaled.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = scaled.softmax(-1)
    scaled = scaled.masked_fill(probs < min_p[:, None] * probs.amax(-1, keepdim=True), float("-inf"))
    return torch.where(greedy, logits, scaled)


def sample_rows(logits, temperature, top_k, top_p, min_p, penalty, seen, seed, step, mode: Mode) -> torch.Tensor:
    """logits (B, V) -> next ids (B,): argmax for greedy rows, a seeded draw for the others."""
    logits = process_rows(logits.float(), temperature, top_k, top_p, min_p, penalty, seen, mode)
    if not mode.sample:
        return logits.argmax(-1)
    gumbel = -torch.log(-torch.log(uniform(seed, step, logits.shape[-1])))
    # a filtered (-inf) token stays out even where the noise is +inf (u rounds to 1.0 in fp32: -inf + inf is NaN,
    # which argmax would pick)
    drawn = (logits + gumbel).masked_fill(logits == float("-inf"), float("-inf")).argmax(-1)
    return torch.where(temperature == 0.0, logits.argmax(-1), drawn)


# A counter-based hash in 32-bit words held in int64 tensors: no product can overflow (signed overflow is
# undefined behaviour in the C++ that torch.compile writes for the CPU, and real: a 64-bit wrapping
# hash compiled into a kernel that never ended), so eager, compiled and CUDA steps draw the same bits.
_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2**32 for x in [0, 2**32) and a constant c, in two 16-bit halves of c (products < 2**48)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser (a bijection of [0, 2**32))."""
    x = _mul32(x ^ (x >> 16), 0x85EBCA6B)
    x = _mul32(x ^ (x >> 13), 0xC2B2AE35)
    return x ^ (x >> 16)


def uniform(seed: torch.Tensor, step: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n) fp32 in (0, 1): a pure function of each row's (seed, step) and the column (any int64 seed)."""
    row = _mix32(_mix32(_mix32((seed >> 32) & _M32) ^ (seed & _M32)) ^ (step & _M32))  # (B,)
    column = _mul32(torch.arange(n, device=seed.device), 0x9E3779B9)  # (n,): the golden ratio in 32 bits
    bits = _mix32((row[:, None] + column) & _M32) >> 8  # 24 random bits
    return (bits.float() + 0.5) * 2.0**-24


# -- one row, from SamplingParams (the reference-checked form) -----------------------------------
def _one_row(logits: torch.Tensor, params: SamplingParams, history: torch.Tensor | None):
    x = logits.float().reshape(1, -1)
    seen = torch.zeros_like(x, dtype=torch.bool)
    if history is not None and history.numel():
        seen[0, history.to(x.device)] = True
    t = torch.tensor
    tensors = (t([params.temperature]), t([params.top_k]), t([params.top_p]), t([params.min_p]),
               t([params.repetition_penalty]))
    mode = Mode(params.repetition_penalty != 1.0, not params.greedy,
                not params.greedy and (params.top_k > 0 or params.top_p < 1.0), False)
    return x, [v.to(x.device) for v in tensors], seen, mode


def process_logits(logits: torch.Tensor, params: SamplingParams, history: torch.Tensor | None = None) -> torch.Tensor:
    """logits (V,) -> processed logits (V,) under one request's parameters; filtered entries are -inf."""
    x, tensors, seen, mode = _one_row(logits, params, history)
    return process_rows(x, *tensors, seen, mode)[0]


def sample(logits: torch.Tensor, params: SamplingParams, history: torch.Tensor | None = None,
           generator: torch.Generator | None = None) -> int:
    """logits (V,) -> the next token id; the draw's seed comes from `generator` (or the OS)."""
    x, tensors, seen, mode = _one_row(logits, params, history)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator)) if generator is not None else random_seed()
    zero = torch.zeros(1, dtype=torch.long, device=x.device)
    return int(sample_rows(x, *tensors, seen, zero + seed, zero, mode)[0])
