"""The Phi-3 decoder in pure torch. Module paths equal the checkpoint's keys.

    tokens (B, T) -> embed_tokens -> N x Block -> norm -> lm_head -> logits (B, T, V)

No sampling, no tokenizer, no I/O: `forward(tokens, input_pos, cache)` and nothing else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .cache import KVCache
from .config import Phi3Config
from .rope import RotaryEmbedding, apply_rotary

ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")


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
        self.qkv_proj = nn.Linear(config.hidden_size, sum(self.sizes), bias=False)  # rows [Q | K | V]
        self.o_proj = nn.Linear(config.q_size, config.hidden_size, bias=False)
        self.implementation = "sdpa"

    def forward(self, x, cos, sin, mask, input_pos, cache: KVCache | None):
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.sizes, dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, input_pos, k, v)  # (B, Hkv, S, D)
        if self.implementation == "eager":
            y = _eager_attention(q, k, v, mask)
        else:
            gqa = self.n_heads != self.n_kv_heads
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, H*D) -> (B, T, C)


def _eager_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(D)) v with the softmax in fp32; mask None means causal over T."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, S, D)
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, T, S)
    if mask is None:
        T, S = scores.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


class MLP(nn.Module):
    def __init__(self, config: Phi3Config):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)  # [gate | up]
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

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

    def forward(self, x, cos, sin, mask, input_pos, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos, cache)
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
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rope = RotaryEmbedding(config)
        self.set_attn_implementation(attn_implementation)
        self.gradient_checkpointing = False  # training: recompute each block's activations in backward

    def set_attn_implementation(self, name: str) -> None:
        """'sdpa' (torch's fused kernels: flash / memory-efficient where available) or 'eager'."""
        name = {"flash_attention_2": "sdpa"}.get(name, name)
        if name not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation must be one of {ATTENTION_IMPLEMENTATIONS}, got {name!r}")
        for block in self.model.layers:
            block.self_attn.implementation = name

    def reset_rope(self, device=None) -> None:
        """(Re)build the RoPE tables on `device`; needed after building the model on the meta device."""
        self.rope = RotaryEmbedding(self.config, device=device)

    def uses_long_rope(self, seq_len: int) -> bool:
        """LongRoPE's rule: long factors once the sequence passes the pre-training context."""
        return self.config.is_longrope and seq_len > self.config.original_max_position_embeddings

    def forward(
        self,
        tokens: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        cache: KVCache | None = None,
        *,
        long_rope: bool | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """tokens (B, T), input_pos (T,) positions of those tokens -> logits (B, T, V) (or (B, 1, V)).

        Without a cache the tokens are the whole sequence. With one, keys and values are written
        at `input_pos` and attention reads the whole cache, masked to what each query may see.
        `long_rope` picks LongRoPE's factor set; None decides from max(input_pos) + 1 (a host sync).
        """
        B, T = tokens.shape
        if input_pos is None:
            input_pos = torch.arange(T, device=tokens.device)
        if long_rope is None:
            long_rope = self.uses_long_rope(int(input_pos.max()) + 1)
        x = self.model.embed_tokens(tokens)  # (B, T, C)
        cos, sin = self.rope(input_pos[None], long_rope, x.dtype)  # (1, T, R)
        mask = self.attention_mask(input_pos, cache.max_len if cache is not None else None)
        for block in self.model.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, mask, input_pos, cache, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, input_pos, cache)
        x = self.model.norm(x[:, -1:] if last_only else x)
        return self.lm_head(x)

    def attention_mask(self, input_pos: torch.Tensor, cache_len: int | None) -> torch.Tensor | None:
        """(T, S) bool, True where query i may see key j: j <= i and j > i - sliding_window.

        None means plain causal over the T tokens themselves (lets SDPA pick its fastest kernel).
        """
        window = self.config.sliding_window
        T = input_pos.shape[0]
        if cache_len is None and (window is None or T <= window):
            return None
        key_pos = torch.arange(cache_len if cache_len is not None else T, device=input_pos.device)
        query_pos = input_pos[:, None] if cache_len is not None else key_pos[:T, None]
        mask = key_pos[None, :] <= query_pos
        if window is not None:
            mask &= key_pos[None, :] > query_pos - window
        return mask
