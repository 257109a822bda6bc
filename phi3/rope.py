"""Rotary position embeddings: plain RoPE and Phi-3's LongRoPE.

LongRoPE stretches each frequency's wavelength by its own factor: `short_factor` while the
sequence fits the pre-training context (`original_max_position_embeddings`), `long_factor` once
it is longer. cos and sin are both scaled by the attention factor sqrt(1 + ln(s)/ln(original)),
s = max / original, for short and long alike. The choice of factors belongs to the caller: it is
made per sequence (per row of a batch), from the length being processed.

cos/sin are computed in fp32 exactly as the reference does (position * inv_freq, cat, cos/sin,
scale, cast), once per position into two tables (short, long); a forward gathers each row's
entries by (factor set, position), so rows of one batch can use different factor sets.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import Phi3Config, longrope_attention_factor


def inverse_frequencies(config: Phi3Config, factors: list[float] | None, device=None) -> torch.Tensor:
    """(rotary_dim/2,) fp32: inv_freq[i] = 1 / (factor[i] * theta^(2i/d))."""
    dim = config.rotary_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    base = config.rope_theta ** exponents
    if factors is not None:
        base = torch.tensor(factors, dtype=torch.float32, device=device) * base
    return 1.0 / base


class RotaryEmbedding(nn.Module):
    """Short and long inverse frequencies, and cos/sin tables built from them on demand."""

    def __init__(self, config: Phi3Config, device=None):
        super().__init__()
        scaling = config.rope_scaling
        if scaling is None:
            short = long = inverse_frequencies(config, None, device)
            self.attention_factor = 1.0
            self.missing = None
        else:
            long = inverse_frequencies(config, scaling["long_factor"], device)
            # A shape-only preset may lack the short factors: the module builds, running it fails.
            short = inverse_frequencies(config, scaling["short_factor"], device) if "short_factor" in scaling else None
            self.missing = None if short is not None else f"{config.source}: the RoPE short factors are unknown"
            short = long if short is None else short
            self.attention_factor = longrope_attention_factor(config)
        self.register_buffer("inv_freq", torch.stack([short, long]), persistent=False)  # (2, R/2): short, long
        self.cos: torch.Tensor | None = None  # (2, L, R) in the activations' dtype
        self.sin: torch.Tensor | None = None

    def _apply(self, fn, recurse=True):
        """`module.to(...)`, `.half()`, `.cuda()`: the inverse frequencies move but stay fp32 (rounded
        to bf16 they would shift every rotation angle), and cos/sin tables already built move with them
        (keeping their dtype, which `tables` owns)."""
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        device = self.inv_freq.device
        if not inv_freq.is_meta and device.type != "meta":
            self.inv_freq = inv_freq.to(device)  # the fp32 values as they were, on the new device
        if self.cos is not None and self.cos.device != device:
            self.cos, self.sin = self.cos.to(device), self.sin.to(device)
        return self

    def tables(self, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (2, >= length, R) in `dtype` for positions 0.. (index 0: short factors, 1: long).

        Kept and rebuilt only when too short (or of another dtype); the engine builds its own
        (`build`), so that a captured step never sees these replaced.
        """
        if self.cos is None or self.cos.shape[1] < length or self.cos.dtype != dtype:
            self.cos, self.sin = self.build(max(256, length), dtype)
        return self.cos, self.sin

    def build(self, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """New cos, sin tables (2, length, R) in `dtype`, as `tables` describes."""
        if self.missing:
            raise ValueError(f"{self.missing}; load the checkpoint's own config.json")
        positions = torch.arange(length, device=self.inv_freq.device).float()
        freqs = positions[None, :, None] * self.inv_freq[:, None, :]  # (2, n, R/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_factor).to(dtype), (emb.sin() * self.attention_factor).to(dtype)

    def forward(self, positions: torch.Tensor, long: torch.Tensor, dtype: torch.dtype, length: int,
                tables: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) int < length, long (B,) bool -> cos, sin (B, T, R) in `dtype`, from
        `tables` (cos, sin) when given, else this module's own."""
        cos, sin = tables if tables is not None else self.tables(length, dtype)
        which = long.long()[:, None]  # (B, 1)
        return cos[which, positions], sin[which, positions]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D), cos/sin (B, T, R) with R <= D: rotate the first R dims of each head."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, R)
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :r], x[..., r:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)
