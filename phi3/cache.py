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

`kv_dtype=torch.int8` (opt-in, approximate) stores each position's key and value per KV head as int8
with an fp32 scale per 32 elements (max|x| / 127, rounded to nearest; GGUF's Q8_0 blocks): D + D/8
bytes where the model's dtype takes 2D (bf16) or 4D (fp32), so the pool holds 1.8x or 3.6x the
tokens (a head dimension that 32 does not divide takes one scale per head). Reads dequantize to the
model's dtype. It changes answers (docs/PERFORMANCE.md measures by how much). The C decode step
(csrc/layer.c) writes and reads such a cache itself, rounding as `_int8` does.

On the CPU the pool is allocated but not touched: memory grows with the blocks used (each is zeroed
when first handed out, `zero`), not with the pool's size. Zeros, not garbage, because masked-out
keys still enter q @ k^T in SDPA, and garbage could be NaN.
"""

from __future__ import annotations

import torch

from .config import Phi3Config

BLOCK_SIZE = 16  # positions per block: a cached prefix is reused to the last whole block
KV_DTYPES = {"auto": None, "int8": torch.int8}  # kv_cache_dtype's values: the model's dtype, or int8 with scales


def kv_dtype_of(kv_cache_dtype: str) -> torch.dtype | None:
    """The `kv_dtype` of a `kv_cache_dtype` name ("auto": None, the model's; "int8"); a ValueError for others."""
    if kv_cache_dtype not in KV_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_DTYPES)}, got {kv_cache_dtype!r}")
    return KV_DTYPES[kv_cache_dtype]


class KVCache:
    def __init__(self, config: Phi3Config, rows: int, max_len: int, dtype: torch.dtype, device=None, *,
                 tokens: int | None = None, block_size: int = BLOCK_SIZE, kv_dtype: torch.dtype | None = None):
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
        if kv_dtype not in (None, dtype, torch.int8):
            raise ValueError(f"a KV cache stores the model's dtype or int8, not {kv_dtype}")
        self.dtype = dtype  # what reads return
        self.kv_dtype = torch.int8 if kv_dtype == torch.int8 else None  # as nbytes takes it
        alloc = torch.empty if device.type == "cpu" else torch.zeros  # CPU: touched as used (module docstring)
        store, layers = torch.int8 if self.quantized else dtype, config.num_hidden_layers
        self.k = [alloc(shape, dtype=store, device=device) for _ in range(layers)]
        self.v = [alloc(shape, dtype=store, device=device) for _ in range(layers)]
        # int8: each position's scales per KV head (N, bs, Hkv, groups); empty lists otherwise
        groups = shape[3] // kv_group(shape[3])  # scales per position and head
        self.k_scale = [alloc(*shape[:3], groups, device=device) for _ in range(layers)] if self.quantized else []
        self.v_scale = [alloc(*shape[:3], groups, device=device) for _ in range(layers)] if self.quantized else []
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

    @property
    def quantized(self) -> bool:
        """Whether the pool stores int8 values with scales."""
        return self.kv_dtype is not None

    @property
    def stored(self) -> str:
        """What the pool stores: "int8", or the model's dtype ("float32", "bfloat16", ...)."""
        return "int8" if self.quantized else str(self.dtype).removeprefix("torch.")

    @staticmethod
    def nbytes(config: Phi3Config, tokens: int, dtype: torch.dtype, kv_dtype: torch.dtype | None = None) -> int:
        """Bytes a pool of `tokens` positions takes (int8: a byte per element, an fp32 scale per group)."""
        if kv_dtype == torch.int8:
            D = config.head_dim
            return 2 * config.num_hidden_layers * config.num_key_value_heads * (D + 4 * D // kv_group(D)) * tokens
        return config.kv_cache_bytes(tokens, torch.finfo(dtype).bits // 8)

    def zero(self, blocks) -> None:
        """Fill `blocks` with zeros in every layer (a block's first use)."""
        index = torch.as_tensor(list(blocks), dtype=torch.long, device=self.block_table.device)
        if index.numel():
            for t in (*self.k, *self.v, *self.k_scale, *self.v_scale):
                t.index_fill_(0, index, 0)

    def write(self, layer: int, rows: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v (B, Hkv, T, D) for table rows `rows` (B, 1) at positions (B, T)."""
        kc, vc, bs = self.k[layer], self.v[layer], self.block_size
        where = self.block_table[rows, positions // bs], positions % bs  # (B, T) block and offset
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, T, Hkv, D)
        if self.quantized:
            (kc[where], self.k_scale[layer][where]), (vc[where], self.v_scale[layer][where]) = _int8(k), _int8(v)
        else:
            kc[where], vc[where] = k.to(kc.dtype), v.to(vc.dtype)

    def read(self, layer: int, rows: torch.Tensor, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Table rows `rows`' (B,) keys and values at positions 0..kv_len-1, gathered through the table
        as (B, Hkv, kv_len, D)."""
        kc, vc, bs = self.k[layer], self.v[layer], self.block_size
        held = self.block_table[rows, : -(-kv_len // bs)]  # (B, n) the blocks of positions 0..n*bs-1
        B, n = held.shape
        keys = kc[held].view(B, n * bs, *kc.shape[2:])[:, :kv_len]  # (B, S, Hkv, D)
        values = vc[held].view(B, n * bs, *vc.shape[2:])[:, :kv_len]
        if self.quantized:
            keys, values = (_dequantize(q, scale[held].view(B, n * bs, *scale.shape[2:])[:, :kv_len], self.dtype)
                            for q, scale in ((keys, self.k_scale[layer]), (values, self.v_scale[layer])))
        return keys.transpose(1, 2), values.transpose(1, 2)


def kv_group(head_dim: int) -> int:
    """Elements of a head's key or value that share an int8 scale: 32 (as GGUF's Q8_0 blocks), or the
    whole head where it is not a multiple of 32."""
    return 32 if head_dim % 32 == 0 else head_dim


def _int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., D) -> its int8 values (..., D) and fp32 scales (..., D / group): each group of
    `kv_group(D)` elements is q * scale, scale = its max|x| / 127, q rounded to nearest."""
    D = x.shape[-1]
    x = x.float().unflatten(-1, (D // kv_group(D), -1))  # (..., groups, group)
    scale = x.abs().amax(-1) / 127
    q = torch.round(x / torch.where(scale > 0, scale, 1.0)[..., None]).clamp_(-127, 127).to(torch.int8)
    return q.flatten(-2), scale


def _dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 values (..., D) and their scales (..., groups) -> (..., D) in `dtype`."""
    return (q.unflatten(-1, (scale.shape[-1], -1)) * scale[..., None]).flatten(-2).to(dtype)
