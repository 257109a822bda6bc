"""Tiny random Phi-3 checkpoints written by transformers, the reference oracle."""

from __future__ import annotations

import math

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))

VOCAB = 512


def _factors(n: int, lo: float, hi: float, seed: int) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    return sorted((lo + (hi - lo) * torch.rand(n, generator=g)).tolist())


def tiny_config(kind: str) -> dict:
    """Small configs that exercise each Phi-3 feature cheaply.

    longrope: a 128k-style model whose pre-training context is only 32 tokens, so both factor
              sets and the crossing happen within a short test;
    window:   a 4k-style model (plain RoPE) with a sliding window of 8;
    gqa:      medium-style grouped-query attention (8 heads, 2 KV heads) with a window.
    """
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                original_max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
                sliding_window=None, tie_word_embeddings=False, bos_token_id=1, eos_token_id=None,
                pad_token_id=0)
    head_half = base["hidden_size"] // base["num_attention_heads"] // 2
    if kind == "longrope":
        base.update(original_max_position_embeddings=32, sliding_window=262144,
                    rope_scaling={"type": "longrope", "short_factor": _factors(head_half, 1.0, 3.0, 0),
                                  "long_factor": _factors(head_half, 1.0, 60.0, 1)})
    elif kind == "partial":  # Phi-4-mini-style partial rotary (half of each head), tied embeddings
        base.update(original_max_position_embeddings=32, tie_word_embeddings=True, partial_rotary_factor=0.5,
                    rope_scaling={"type": "longrope", "short_factor": _factors(head_half // 2, 1.0, 3.0, 2),
                                  "long_factor": _factors(head_half // 2, 1.0, 60.0, 3)})
    elif kind == "window":
        base.update(sliding_window=8, max_position_embeddings=128, original_max_position_embeddings=128)
    elif kind == "gqa":
        base.update(num_attention_heads=8, num_key_value_heads=2, hidden_size=128, sliding_window=16)
    else:
        raise ValueError(kind)
    return base


def random_ids(n: int, seed: int) -> list[int]:
    """`n` token ids of the tiny vocabulary (no special ones), the same for the same seed."""
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy_reference(ref, prompt: list[int], new: int) -> list[int]:
    """transformers' greedy continuation of `prompt` (`new` tokens) by the reference model `ref`, on its device."""
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt], device=ref.device), max_new_tokens=new, do_sample=False,
                           attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=ref.device))
    return out[0, len(prompt):].tolist()


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights large enough that logits are well separated (greedy decoding has no near-ties)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norms
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "embed" in name else 1 / math.sqrt(p.shape[1])))


def write_checkpoint(folder, kind: str, seed: int = 0, max_shard_size=None, **overrides):
    """Write a random transformers Phi3ForCausalLM to `folder`; return it (fp32, eval).

    `overrides` replace fields of `tiny_config(kind)`.
    """
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(seed)
    cfg = {**tiny_config(kind), **overrides}
    model = Phi3ForCausalLM(Phi3Config(**cfg)).eval()
    randomize(model, seed)
    model.save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return model


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """kind -> (folder, transformers model) for longrope, window, gqa, partial and a sharded longrope copy."""
    out = {}
    for kind in ("longrope", "window", "gqa", "partial"):
        folder = tmp_path_factory.mktemp(kind)
        out[kind] = (folder, write_checkpoint(folder, kind))
    folder = tmp_path_factory.mktemp("sharded")
    out["sharded"] = (folder, write_checkpoint(folder, "longrope", seed=3, max_shard_size="100KB"))
    return out


@pytest.fixture
def ran_in_c(monkeypatch) -> list[bool]:
    """Per decode step from here on: did phi3.kernels run the model's layers in C (csrc/layer.c)?"""
    import phi3.kernels

    calls, real = [], phi3.kernels.decode_layers

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out is not None)
        return out
    monkeypatch.setattr(phi3.kernels, "decode_layers", spy)
    return calls
