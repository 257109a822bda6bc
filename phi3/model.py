"""The Phi-3 decoder in pure torch. Module paths equal the checkpoint's keys.

    tokens (B, T) -> embed_tokens -> N x Block -> norm -> lm_head -> logits (B, T, V)

No sampling, no tokenizer, no I/O: `forward(tokens, positions, cache)` and nothing else. An eager
fp32 decode step on the CPU offers its layers to `kernels.decode_layers` first (the same layers in
C, csrc/layer.c), and runs the blocks below when it declines.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import kernels
from .cache import KVCache
from .config import Phi3Config
from .rope import RotaryEmbedding, apply_rotary

if TYPE_CHECKING:  # imported where used: torch.nn.attention.bias pulls in torch._dynamo (~1.6 s)
    from torch.nn.attention.bias import CausalBias

ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, weight)` (no bias). On the CPU in fp32, a few rows of x (a decode step) run
    phi3's own kernel (`kernels.dense_linear`), more rows oneDNN's inner product, both faster than
    F.linear's BLAS path at decode and prefill sizes (bench/linear.py, docs/PERFORMANCE.md); the
    same result up to fp32 rounding. Not where gradients are needed (neither has a backward), nor
    in other dtypes, nor under torch.compile (which lowers F.linear its own way)."""
    if (x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu"
            and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return kernels.cpu_linear(x, weight)
    return F.linear(x, weight)


class Linear(nn.Linear):
    """`nn.Linear` without bias whose forward is `linear` above (the same parameters and keys)."""

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__(in_features, out_features, bias=False, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)

    def c_linear(self) -> kernels.CLinear | None:
        """What phi3's C decode step (`kernels.decode_layers`) runs of this layer: its weight; None
        for a subclass with another forward."""
        return kernels.CLinear(self.weight) if type(self).forward is Linear.forward else None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, cast back, then scale: the reference's order of operations.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: Phi3Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.sizes = (config.q_size, config.kv_size, config.kv_size)
        self.qkv_proj = Linear(config.hidden_size, sum(self.sizes))  # rows [Q | K | V]
        self.o_proj = Linear(config.q_size, config.hidden_size)
        self.implementation = "sdpa"

    def forward(self, x: torch.Tensor, ctx: "Context") -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.sizes, dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
        attend = _eager_attention if self.implementation == "eager" else _sdpa
        if ctx.cache is None:
            y = attend(q, k, v, ctx.mask)
        else:
            ctx.cache.write(self.layer_idx, ctx.rows, ctx.positions, k, v)
            if ctx.parts is None:  # (B, Hkv, S, D): each row's keys 0..S-1, the new ones included
                y = attend(q, *ctx.cache.read(self.layer_idx, ctx.rows[:, 0], ctx.kv_len), ctx.mask)
            else:  # each part of the rows over its own keys (Phi3.forward's kv_parts)
                y = torch.empty_like(q)
                for index, kv_len, mask in ctx.parts:
                    keys, values = ctx.cache.read(self.layer_idx, ctx.rows[index, 0], kv_len)
                    y.index_copy_(0, index, attend(q[index], keys, values, mask))
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, H*D) -> (B, T, C)


def _sdpa(q, k, v, mask):
    """torch's fused attention. mask: None (causal, T == S), a lower-right CausalBias (a chunk
    after a prefix: flash kernels on CUDA), or a bool tensor (sliding window, decode rows).

    With grouped-query attention on CUDA, what keeps SDPA off its slow math backend: flash takes
    GQA but no mask tensor (and no fp32), memory-efficient takes masks and fp32 but equal head
    counts. So masked calls (every decode step) fold the query heads into rows (`_sdpa_grouped`),
    and the rest repeat K/V where flash cannot run them (a CausalBias, fp32)."""
    gqa = q.shape[1] != k.shape[1]
    if gqa and q.is_cuda:
        if isinstance(mask, torch.Tensor):
            return _sdpa_grouped(q, k, v, mask)
        if mask is not None or q.dtype == torch.float32:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
            gqa = False
    if mask is not None and not isinstance(mask, torch.Tensor):  # a CausalBias
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)


def _sdpa_grouped(q, k, v, mask):
    """Grouped-query attention with a bool mask as attention over equal head counts, without copying
    K/V: the g query heads that share KV head j (heads j*g .. j*g+g-1, as `enable_gqa` pairs them)
    become g times as many query rows of head j, each row still attending on its own.
    q (B, H, T, D), k/v (B, Hkv, S, D), mask (B or 1, 1, T, S) -> (B, H, T, D)."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    g = H // Hkv
    rows = mask[:, :, None].expand(-1, -1, g, -1, -1).reshape(mask.shape[0], 1, g * T, S)  # row i*T + t: mask row t
    y = F.scaled_dot_product_attention(q.reshape(B, Hkv, g * T, D), k, v, attn_mask=rows)
    return y.reshape(B, H, T, D)


def _eager_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(D)) v with the softmax in fp32; mask as for `_sdpa`."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, S, D)
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, T, S)
    if not isinstance(mask, torch.Tensor):  # causal, aligned to the last key
        T, S = scores.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


class MLP(nn.Module):
    def __init__(self, config: Phi3Config):
        super().__init__()
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size)  # [gate | up]
        self.down_proj = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))


class Block(nn.Module):
    def __init__(self, config: Phi3Config, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, ctx: "Context") -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class Decoder(nn.Module):
    """Holds what the checkpoint keys as `model.*`."""

    def __init__(self, config: Phi3Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Phi3(nn.Module):
    def __init__(self, config: Phi3Config, attn_implementation: str = "sdpa"):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rope = RotaryEmbedding(config, device="cpu")  # small; real even when the model is built on meta
        self.set_attn_implementation(attn_implementation)
        self.gradient_checkpointing = False  # training: recompute each block's activations in backward
        self.prefills = 0  # forwards other than one-token cached steps: kernels.decode_layers re-reads the layers after each

    def set_attn_implementation(self, name: str) -> None:
        """'sdpa' (torch's fused kernels: flash / memory-efficient where available) or 'eager'."""
        name = {"flash_attention_2": "sdpa"}.get(name, name)
        if name not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation must be one of {ATTENTION_IMPLEMENTATIONS}, got {name!r}")
        for block in self.model.layers:
            block.self_attn.implementation = name

    def reset_rope(self, device=None) -> None:
        """(Re)build the RoPE frequencies on `device`; needed after building the model on the meta device."""
        self.rope = RotaryEmbedding(self.config, device=device)

    def uses_long_rope(self, seq_len: int) -> bool:
        """LongRoPE's rule: long factors once the sequence passes the pre-training context."""
        return self.config.is_longrope and seq_len > self.config.original_max_position_embeddings

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        *,
        slot: int | torch.Tensor = 0,
        kv_len: int | None = None,
        kv_parts: Sequence[tuple[torch.Tensor, int]] | None = None,
        long_rope: bool | None = None,
        last_only: bool = False,
        read: torch.Tensor | None = None,
        hidden: bool = False,
    ) -> torch.Tensor:
        """tokens (B, T), positions (B, T) of those tokens in their sequences -> logits (B, T, V)
        (or (B, 1, V) with `last_only`; (1, n, V) with `read`, n indices into the B·T positions
        taken row by row: only those go through the final norm and the output layer). `hidden`: the
        final norm's output (the output layer's input, C wide) instead of logits.

        Without a cache, each row is a whole sequence (positions default to 0..T-1) and `long_rope`
        picks LongRoPE's factor set (None: by the length, as the reference does). With a cache, row
        b is cache row `slot + b`: its keys and values are written at its positions through the
        row's block table, attention reads its positions 0..kv_len-1 (default: all) masked per row
        (causal, sliding window), and each row's factor set is the cache's `long_rope[slot + b]`.
        `slot` may also be a (B,) tensor of cache rows: a batched prefill of rows that are not
        adjacent (the engine's scoring requests), or, one token each, several rows that are one
        sequence's next positions (speculative decoding's verify step: every row's keys are written
        before any row attends, each up to its own position). `kv_parts`: (rows, kv_len) pairs whose
        rows, (n,) index tensors, partition 0..B-1: those rows read keys 0..kv_len-1 only, so that a
        batch of short rows beside a long one does not read (or gather) the long one's length each
        (kv_len then defaults to the longest part's).
        """
        B, T = tokens.shape
        if cache is not None and not isinstance(slot, int):
            if slot.shape != (B,) or (slot.device.type == "cpu" and B and not torch.compiler.is_compiling()
                                      and not 0 <= int(slot.min()) <= int(slot.max()) < cache.rows):
                raise ValueError(f"slot must be a ({B},) tensor of rows of a cache of {cache.rows} rows, got {slot.tolist()}")
        elif cache is not None and not 0 <= slot <= slot + B <= cache.rows:
            raise ValueError(f"rows {slot}..{slot + B - 1} do not fit a cache of {cache.rows} rows")
        if kv_parts is not None:
            if cache is None:
                raise ValueError("kv_parts needs a cache")
            kv_len = max(n for _, n in kv_parts) if kv_len is None else kv_len
            if any(not 1 <= n <= kv_len for _, n in kv_parts) or (
                    tokens.device.type == "cpu" and not torch.compiler.is_compiling()
                    and not torch.equal(torch.cat([i for i, _ in kv_parts]).sort().values, torch.arange(B))):
                raise ValueError(f"kv_parts must partition the {B} rows, each part reading 1..kv_len ({kv_len}) keys, "
                                 f"got {[(i.tolist(), n) for i, n in kv_parts]}")
        if cache is not None and not (kv_len is None or 1 <= kv_len <= cache.scratch):
            raise ValueError(f"kv_len {kv_len} does not fit a cache of {cache.scratch} positions")
        if (T != 1 or cache is None) and not torch.compiler.is_compiling():  # (a compiled step: no C layers)
            self.prefills += 1
        x = self.model.embed_tokens(tokens)  # (B, T, C)
        if cache is None:
            table_len = T if positions is None else int(positions.max()) + 1
            if long_rope is None:
                long_rope = self.uses_long_rope(table_len)
            long = torch.full((B,), long_rope, dtype=torch.bool, device=tokens.device)
            kv_len, rows = T, None
        else:
            rows = (torch.arange(slot, slot + B, device=tokens.device) if isinstance(slot, int) else slot)[:, None]  # (B, 1)
            long = cache.long_rope[rows[:, 0]]
            table_len, kv_len = cache.scratch + 1, cache.scratch if kv_len is None else kv_len
        if positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        tables = (cache.cos, cache.sin) if cache is not None and cache.cos is not None and cache.cos.dtype == x.dtype \
            else None  # an engine's cache owns its tables (see engine.py)
        cos, sin = self.rope(positions, long, x.dtype, table_len, tables)  # (B, T, R)
        fused = None
        if T == 1 and cache is not None and x.device.type == "cpu" and not torch.is_grad_enabled() \
                and not torch.compiler.is_compiling():  # a CPU decode step: all layers in C when they qualify
            fused = kernels.decode_layers(self, x, positions, cos, sin, cache, slot, kv_len)
        if fused is not None:
            x = fused
        else:
            parts = None if kv_parts is None or len(kv_parts) == 1 else tuple(
                (index, n, self.attention_mask(positions[index], n, True)) for index, n in kv_parts)
            if kv_parts is not None and parts is None:
                kv_len = kv_parts[0][1]
            mask = None if parts else self.attention_mask(positions, kv_len, cache is not None)
            ctx = Context(positions, cos, sin, mask, cache, slot, rows, kv_len, parts)
            for block in self.model.layers:
                if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                    x = checkpoint(block, x, ctx, use_reentrant=False)
                else:
                    x = block(x, ctx)
        x = self.model.norm(x[:, -1:] if last_only else x if read is None else x.reshape(B * T, -1)[read][None])
        return x if hidden else self.lm_head(x)

    def attention_mask(self, positions: torch.Tensor, kv_len: int, cached: bool):
        """What query (b, t) may see of keys 0..kv_len-1: key j <= positions[b, t] and
        j > positions[b, t] - sliding_window.

        None (plain causal over the T tokens themselves) or a lower-right `CausalBias` (T tokens
        after a prefix) where that is the whole rule, so SDPA can pick its flash kernels; else a
        (B, 1, T, kv_len) bool tensor. A cached forward of T > 1 tokens in one row must have positions
        kv_len - T .. kv_len - 1 (a prefill chunk); in several rows (a batched prefill), each row's
        own, any padding at a position past kv_len."""
        B, T = positions.shape
        window = self.config.sliding_window
        windowed = window is not None and kv_len > window
        if not windowed and T == kv_len and (B == 1 or not cached):
            return None
        if not windowed and cached and T > 1 and B == 1 and positions.is_cuda:
            from torch.nn.attention.bias import causal_lower_right

            return causal_lower_right(T, kv_len)
        key = torch.arange(kv_len, device=positions.device)
        query = positions[:, :, None]  # (B, T, 1)
        mask = key <= query
        if windowed:
            mask &= key > query - window
        return mask[:, None]  # (B, 1, T, kv_len)


class Context(NamedTuple):
    """What every layer needs to know about one forward."""

    positions: torch.Tensor  # (B, T)
    cos: torch.Tensor  # (B, T, R)
    sin: torch.Tensor
    mask: torch.Tensor | CausalBias | None  # see Phi3.attention_mask
    cache: KVCache | None
    slot: int  # row b is cache row `slot + b`
    rows: torch.Tensor | None  # (B, 1): the same slots as a tensor
    kv_len: int  # keys each row attends over
    parts: tuple[tuple[torch.Tensor, int, torch.Tensor], ...] | None = None  # (rows, kv_len, mask) per part, or all rows
