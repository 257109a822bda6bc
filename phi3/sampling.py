"""`SamplingParams` (validated) and `sample()`: a pure function of logits and params.

Order of the logits processors, as transformers applies them: repetition penalty (over prompt
and generated ids), then temperature, top-k, top-p, min-p; then argmax (temperature 0) or a
draw from the softmax with the request's own seeded generator.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must be non-empty strings, got {s!r}")

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


def process_logits(logits: torch.Tensor, params: SamplingParams, history: torch.Tensor | None) -> torch.Tensor:
    """logits (V,) fp32 -> processed logits (V,); filtered entries are -inf."""
    if params.repetition_penalty != 1.0 and history is not None and history.numel():
        seen = logits.gather(0, history)
        seen = torch.where(seen < 0, seen * params.repetition_penalty, seen / params.repetition_penalty)
        logits = logits.scatter(0, history, seen)
    if params.greedy:
        return logits
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - params.top_p
        drop[-1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    if params.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, history: torch.Tensor | None = None,
           generator: torch.Generator | None = None) -> int:
    """logits (V,) -> the next token id."""
    logits = process_logits(logits.float(), params, history)
    if params.greedy:
        return int(logits.argmax())
    # Drawn on the CPU with a CPU generator: the same seed gives the same tokens on any device.
    probs = logits.softmax(-1).cpu()
    return int(torch.multinomial(probs, 1, generator=generator))
