"""The KV cache: one pool of fixed-size blocks per layer, and a block table per row.

    row b, position p ─► block_table[b, p // block_size] = block n ─► k[layer][n, p % block_size]  (Hkv, D)

`k[layer]` and `v[layer]` are (blocks, block_size, Hkv, D): flash-attn's and vLLM's paged layout.
A sequence holds only the blocks its tokens fill; which row owns which block, and which blocks are
shared by several rows (a cached prefix), is `blocks.BlockManager`'s business, not the cache's.
Keys are stored after RoPE, so each row also remembers which LongRoPE factor set rotated its keys
(`long_rope`, a device tensor the forward reads per row).

Shapes are fixed from construction (the table is (rows, columns) whatever each row holds), which is
what lets the decode step be compiled and captured in CUDA graphs: the table is a device tensor
whose entries change between steps, never its shape.

Block 0 is scratch. The table's last column always points at it, and every column a row does not
hold does too: position `scratch` (the first of the last column) takes the writes of rows that a
batched decode step carries but that are not decoding (free rows, rows between prefill chunks); no
real query sees it, since a query at position p reads keys 0..p only. A cache built without
`tokens` gives each row its own blocks for `max_len` positions (a static layout, for direct use of
`Phi3.forward` with a cache); the engine passes `tokens` and hands blocks out itself.

On the CPU the pool is allocated but not touched: memory grows with the blocks used (each is zeroed
when first handed out, `zero`), not with the pool's size. Zeros, not garbage, because masked-out
keys still enter q @ k^T in SDPA, and garbage could be NaN.
"""

from __future__ import annotations

import torch

from .config import Phi3Config

BLOCK_SIZE = 16  # positions per block: a cached prefix is reused to the last whole block


class KVCache:
    def __init__(self, config: Phi3Config, rows: int, max_len: int, dtype: torch.dtype, device=None, *,
                 tokens: int | None = None, block_size: int = BLOCK_SIZE):
        for name, value, lo in (("rows", rows, 1), ("max_len", max_len, 1), ("block_size", block_size, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < lo:
                raise ValueError(f"a cache needs a positive integer {name}, got {value!r}")
        if max_len > config.max_position_embeddings:
            raise ValueError(f"a cache of {max_len} positions exceeds the model's context "
                             f"(max_position_embeddings = {config.max_position_embeddings})")
        device = torch.device(device or "cpu")
        columns = -(-max_len // block_size) + 1  # the last one: scratch
        static = tokens is None
        blocks = 1 + (rows * (columns - 1) if static else -(-tokens // block_size))
        shape = (blocks, block_size, config.num_key_value_heads, config.head_dim)  # (N, bs, Hkv, D)
        alloc = torch.empty if device.type == "cpu" else torch.zeros  # CPU: touched as used (module docstring)
        self.k = [alloc(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [alloc(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.rows, self.max_len, self.block_size, self.blocks = rows, max_len, block_size, blocks
        self.scratch = (columns - 1) * block_size  # the position idle rows write at
        self.block_table = torch.zeros(rows, columns, dtype=torch.long, device=device)  # (rows, columns)
        self.long_rope = torch.zeros(rows, dtype=torch.bool, device=device)  # (rows,) factor set of each row's keys
        self.cos: torch.Tensor | None = None  # the engine's own RoPE tables (2, > scratch, R), see Engine
        self.sin: torch.Tensor | None = None
        self.zero(range(blocks) if static else [0])
        if static:
            self.block_table[:, :-1] = torch.arange(1, blocks, device=device).view(rows, columns - 1)

    @property
    def tokens(self) -> int:
        """Positions the pool holds, scratch block excluded."""
        return (self.blocks - 1) * self.block_size

    @staticmethod
    def nbytes(config: Phi3Config, tokens: int, dtype: torch.dtype) -> int:
        """Bytes a pool of `tokens` positions takes."""
        return config.kv_cache_bytes(tokens, torch.finfo(dtype).bits // 8)

    def zero(self, blocks) -> None:
        """Fill `blocks` with zeros in every layer (a block's first use)."""
        index = torch.as_tensor(list(blocks), dtype=torch.long, device=self.block_table.device)
        if index.numel():
            for t in (*self.k, *self.v):
                t.index_fill_(0, index, 0)

    def write(self, layer: int, rows: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v (B, Hkv, T, D) for table rows `rows` (B, 1) at positions (B, T)."""
        kc, vc, bs = self.k[layer], self.v[layer], self.block_size
        where = self.block_table[rows, positions // bs], positions % bs  # (B, T) block and offset
        kc[where] = k.transpose(1, 2).to(kc.dtype)  # (B, T, Hkv, D)
        vc[where] = v.transpose(1, 2).to(vc.dtype)

    def read(self, layer: int, rows: torch.Tensor, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Table rows `rows`' (B,) keys and values at positions 0..kv_len-1, gathered through the table
        as (B, Hkv, kv_len, D)."""
        kc, vc, bs = self.k[layer], self.v[layer], self.block_size
        held = self.block_table[rows, : -(-kv_len // bs)]  # (B, n) the blocks of positions 0..n*bs-1
        B, n = held.shape
        keys = kc[held].view(B, n * bs, *kc.shape[2:])[:, :kv_len]  # (B, S, Hkv, D)
        values = vc[held].view(B, n * bs, *vc.shape[2:])[:, :kv_len]
        return keys.transpose(1, 2), values.transpose(1, 2)
