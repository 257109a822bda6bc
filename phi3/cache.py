"""The KV cache: allocated once, `slots` rows × `max_len` positions per layer, written by index.

Fixed shapes are what let the decode step be compiled and captured in CUDA graphs. Each slot
holds one sequence. Keys are stored after RoPE, so each slot also remembers which LongRoPE
factor set rotated its keys (`long_rope`, a device tensor the forward reads per row): a sequence
that crosses the pre-training context is re-run with the long factors (see engine.py).

One extra position per slot, index `max_len` (`scratch`), takes the writes of rows that a batched
decode step carries but that are not decoding (free slots, rows between prefill chunks): no real
query ever sees it, since a query at position p reads keys 0..p only.
"""

from __future__ import annotations

import torch

from .config import Phi3Config


class KVCache:
    def __init__(self, config: Phi3Config, slots: int, max_len: int, dtype: torch.dtype, device=None):
        if not isinstance(slots, int) or slots < 1:
            raise ValueError(f"a cache needs at least one slot, got {slots!r}")
        if not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"a cache needs a positive length, got {max_len!r}")
        if max_len > config.max_position_embeddings:
            raise ValueError(f"a cache of {max_len} positions exceeds the model's context "
                             f"(max_position_embeddings = {config.max_position_embeddings})")
        shape = (slots, config.num_key_value_heads, max_len + 1, config.head_dim)  # (S, Hkv, L + 1, D)
        # Zeros, not empty: masked-out positions still enter q @ k^T, and garbage could be NaN.
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.slots, self.max_len, self.scratch = slots, max_len, max_len
        self.long_rope = torch.zeros(slots, dtype=torch.bool, device=device)  # (S,) factor set of each slot's keys

    @staticmethod
    def nbytes(config: Phi3Config, slots: int, max_len: int, dtype: torch.dtype) -> int:
        """Bytes a cache of this size takes (the scratch position included)."""
        return config.kv_cache_bytes(slots * (max_len + 1), torch.finfo(dtype).bits // 8)

    def update(self, layer: int, slot: int, rows: torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, Hkv, T, D) into slots slot..slot+B-1 (`rows`, the same as a (B, 1) tensor)
        at positions (B, T); return those slots' keys and values at positions 0..kv_len-1, as
        (B, Hkv, kv_len, D) views (no copy)."""
        kc, vc = self.k[layer], self.v[layer]
        kc[rows, :, positions] = k.transpose(1, 2)  # advanced indices first: (B, T, Hkv, D)
        vc[rows, :, positions] = v.transpose(1, 2)
        end = slot + k.shape[0]
        return kc[slot:end, :, :kv_len], vc[slot:end, :, :kv_len]
