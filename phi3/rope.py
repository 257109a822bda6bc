"""Rotary position embeddings: plain RoPE and Phi-3's LongRoPE.

LongRoPE stretches each frequency's wavelength by its own factor: `short_factor` while the
sequence fits the pre-training context (`original_max_position_embeddings`), `long_factor` once
it is longer. cos and sin are both scaled by the attention factor sqrt(1 + ln(s)/ln(original)),
s = max / original, for short and long alike. The choice of factors belongs to the caller (see
`phi3.generate`): it is made per sequence, from the length being processed.
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
    """cos/sin tables for given positions, computed on the fly in fp32 (as the reference does)."""

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
        self.register_buffer("inv_freq_short", short, persistent=False)
        self.register_buffer("inv_freq_long", long, persistent=False)

    def forward(self, positions: torch.Tensor, long: bool, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (..., T) int -> cos, sin (..., T, rotary_dim) in `dtype`."""
        if self.missing:
            raise ValueError(f"{self.missing}; load the checkpoint's own config.json")
        inv_freq = self.inv_freq_long if long else self.inv_freq_short
        freqs = positions[..., None].float() * inv_freq  # (..., T, rotary_dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_factor
        sin = emb.sin() * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D), cos/sin (B or 1, T, R) with R <= D: rotate the first R dims of each head."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, R)
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :r], x[..., r:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)
