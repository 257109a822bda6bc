"""The KV cache: preallocated per layer, written by index, passed into `Phi3.forward`.

Fixed shapes are what later let `torch.compile` and CUDA graphs capture the decode step.
Keys are stored after RoPE, so the cache also remembers which LongRoPE factor set rotated them
(`long_rope`): a sequence that crosses the pre-training context must be re-run (see generate.py).
"""

from __future__ import annotations

import torch

from .config import Phi3Config


class KVCache:
    def __init__(self, config: Phi3Config, batch_size: int, max_len: int, dtype: torch.dtype, device=None):
        if max_len > config.max_position_embeddings:
            raise ValueError(f"a cache of {max_len} positions exceeds the model's context "
                             f"(max_position_embeddings = {config.max_position_embeddings})")
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)  # (B, Hkv, S, D)
        # Zeros, not empty: masked-out slots still enter q @ k^T, and garbage could be NaN.
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.max_len = max_len
        self.long_rope: bool | None = None  # the factor set of the keys stored so far

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, Hkv, T, D) at positions input_pos (T,); return the layer's full (B, Hkv, S, D)."""
        self.k[layer].index_copy_(2, input_pos, k)
        self.v[layer].index_copy_(2, input_pos, v)
        return self.k[layer], self.v[layer]
