"""The engine core against transformers' Phi3ForCausalLM on the same random weights (CPU, fp32)."""

from __future__ import annotations

import pytest
import torch

import phi3
from phi3.cache import KVCache
from phi3.config import PRESETS
from phi3.model import Phi3

torch.manual_seed(0)


def _ids(n: int, seed: int = 0, vocab: int = 512) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _reference_logits(ref, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0]


# Lengths around each feature: below/above the 32-token pre-training context of the LongRoPE
# model (short vs long factors), and beyond the sliding windows (8 and 16).
@pytest.mark.parametrize("kind,lengths", [
    ("longrope", [5, 32, 33, 70]),
    ("window", [8, 9, 40]),
    ("gqa", [16, 17, 50]),
    ("sharded", [20, 60]),
    ("partial", [10, 40]),
])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_logits_match_transformers(checkpoints, kind, lengths, attn):
    folder, ref = checkpoints[kind]
    llm = phi3.load(folder, device="cpu", dtype="float32", attn_implementation=attn)
    for n in lengths:
        ids = _ids(n, seed=n)
        ours, theirs = llm.logits(ids), _reference_logits(ref, ids)
        assert ours.shape == (n, 512)
        assert torch.allclose(ours, theirs, atol=1e-4, rtol=0), (kind, n, (ours - theirs).abs().max())


def test_long_and_short_factors_really_differ(checkpoints):
    """Guards the test above: the factor switch changes the logits of the earlier positions."""
    folder, _ = checkpoints["longrope"]
    llm = phi3.load(folder, device="cpu", dtype="float32")
    ids = _ids(40)
    short = llm.logits(ids[:32])
    long = llm.logits(ids)[:32]
    assert (short - long).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["longrope", "window", "gqa"])
def test_cached_decode_equals_full_recompute(checkpoints, kind):
    """Prefill then one token at a time through the KV cache == a full forward at every step.

    The LongRoPE model crosses its 32-token context mid-way: there the slot is prefilled again
    with the long factors, as the engine does."""
    folder, _ = checkpoints[kind]
    llm = phi3.load(folder, device="cpu", dtype="float32")
    model, ids = llm.model, _ids(48, seed=7)
    prompt = 12
    cache = KVCache(llm.config, 2, 64, torch.float32)
    slot = 1  # not the first slot: rows are written where they are told

    def prefill(n):
        cache.long_rope[slot] = model.uses_long_rope(n)
        return model(torch.tensor([ids[:n]]), torch.arange(n)[None], cache, slot=slot, kv_len=n, last_only=True)[0, -1]

    with torch.inference_mode():
        logits = prefill(prompt)
        for n in range(prompt, len(ids) + 1):
            full = llm.logits(ids[:n])[-1]
            assert torch.allclose(logits, full, atol=1e-4, rtol=0), (n, (logits - full).abs().max())
            if n == len(ids):
                break
            if not cache.long_rope[slot] and model.uses_long_rope(n + 1):
                logits = prefill(n + 1)
            else:  # a decode step over both slots, the first one idle at the scratch position
                tokens, positions = torch.tensor([[0], [ids[n]]]), torch.tensor([[cache.scratch], [n]])
                logits = model(tokens, positions, cache, kv_len=64)[slot, -1]


def test_chunked_prefill_equals_one_shot(checkpoints):
    """A prompt written in chunks (each attending over the prefix written so far) == one pass."""
    folder, _ = checkpoints["window"]
    llm = phi3.load(folder, device="cpu", dtype="float32")
    ids = _ids(40, seed=8)
    cache = KVCache(llm.config, 1, 64, torch.float32)
    with torch.inference_mode():
        for start in range(0, 40, 7):
            chunk = ids[start:start + 7]
            end = start + len(chunk)
            logits = llm.model(torch.tensor([chunk]), torch.arange(start, end)[None], cache, kv_len=end)[0]
            full = llm.logits(ids[:end])[start:end]
            assert torch.allclose(logits, full, atol=1e-4, rtol=0), (start, (logits - full).abs().max())


@pytest.mark.parametrize("kind,prompt_len", [("longrope", 20), ("longrope", 40), ("window", 12), ("gqa", 10)])
def test_greedy_tokens_equal_transformers_generate(checkpoints, kind, prompt_len):
    """70 greedy tokens; for the LongRoPE model a 20-token prompt crosses the 32-token context."""
    folder, ref = checkpoints[kind]
    llm = phi3.load(folder, device="cpu", dtype="float32")
    prompt = _ids(prompt_len, seed=11)
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=70, do_sample=False,
                           attention_mask=torch.ones(1, prompt_len, dtype=torch.long))
    theirs = out[0, prompt_len:].tolist()
    done = llm.generate(prompt, max_new_tokens=70)
    assert done.token_ids == theirs
    assert done.finish_reason == "length"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (prompt_len, 70)


def test_crossing_without_recompute_would_differ(checkpoints):
    """Guards the crossing test: keeping the short-factor cache gives other tokens than transformers."""
    folder, ref = checkpoints["longrope"]
    llm = phi3.load(folder, device="cpu", dtype="float32")
    prompt = _ids(20, seed=11)
    n_total = 90
    cache = KVCache(llm.config, 1, n_total, torch.float32)
    seq = list(prompt)
    with torch.inference_mode():
        logits = llm.model(torch.tensor([seq]), torch.arange(20)[None], cache, kv_len=20)[0, -1]
        while len(seq) < n_total:
            seq.append(int(logits.argmax()))
            cache.long_rope[0] = llm.model.uses_long_rope(len(seq))  # new keys long, old ones stay short
            logits = llm.model(torch.tensor([[seq[-1]]]), torch.tensor([[len(seq) - 1]]), cache)[0, -1]
    assert seq[20:] != llm.generate(prompt, max_new_tokens=70).token_ids


def test_stops_on_generation_config_ids(checkpoints):
    folder, ref = checkpoints["window"]
    prompt = _ids(10, seed=5)
    first = phi3.load(folder, dtype="float32").generate(prompt, max_new_tokens=20).token_ids
    llm = phi3.load(folder, dtype="float32")
    llm.stop_ids = frozenset({first[3]})
    done = llm.generate(prompt, max_new_tokens=20)
    assert done.finish_reason == "stop"
    assert done.token_ids == first[: first.index(first[3])]


def test_bf16_stays_close(checkpoints):
    folder, ref = checkpoints["longrope"]
    llm = phi3.load(folder, device="cpu", dtype=torch.bfloat16)
    assert llm.dtype == torch.bfloat16
    ids = _ids(64, seed=2)
    ours, theirs = llm.logits(ids), _reference_logits(ref, ids)
    agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    assert agree >= 0.95, agree


@pytest.mark.parametrize("name", PRESETS)
def test_presets_build_right_shapes_on_meta(name):
    config = phi3.preset(name)
    with torch.device("meta"):
        model = Phi3(config)
    n = sum(p.numel() for p in model.parameters())
    assert n == config.num_parameters()
    qkv = model.model.layers[0].self_attn.qkv_proj.weight
    assert qkv.shape == (config.q_size + 2 * config.kv_size, config.hidden_size)
    assert qkv.device.type == "meta"


def test_preset_parameter_counts():
    assert phi3.preset("phi-3-mini-128k-instruct").num_parameters() == 3_821_079_552
    medium = phi3.preset("phi-3-medium-4k-instruct")
    assert (medium.num_key_value_heads, medium.head_dim, medium.q_size + 2 * medium.kv_size) == (10, 128, 7680)
    assert phi3.preset("phi-3-mini-4k-instruct").sliding_window == 2047


def test_prompt_ids_are_validated(checkpoints):
    import numpy as np

    llm = phi3.load(checkpoints["window"][0], dtype="float32")
    same = llm.generate(np.array([5, 6, 7]), max_new_tokens=3).token_ids
    assert same == llm.generate([5, 6, 7], max_new_tokens=3).token_ids == llm.generate(torch.tensor([5, 6, 7]), max_new_tokens=3).token_ids
    for bad in ([], [5, 512], [-1], [1.5], [True], [5, "a"]):
        with pytest.raises(ValueError, match="prompt is empty|token ids must be integers"):
            llm.generate(bad, max_new_tokens=2)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        llm.generate("text without a tokenizer", max_new_tokens=2)
    with pytest.raises(ValueError, match="context"):
        llm.generate([1] * 200, max_new_tokens=2)  # the window model's context is 128


def test_generation_stops_at_the_context_limit(checkpoints):
    llm = phi3.load(checkpoints["window"][0], dtype="float32")
    done = llm.generate([3] * 120, max_new_tokens=50)
    assert len(done.token_ids) == 8 and done.finish_reason == "length"  # 128 positions in all


def test_real_size_crossing_with_chunked_prefill(tmp_path):
    """Phi-3's own numbers: a 4090-token prompt (prefilled in chunks) crossing 4096 during generation."""
    from conftest import write_checkpoint
    from phi3.engine import PREFILL_CHUNK

    ref = write_checkpoint(tmp_path, "longrope", seed=4, original_max_position_embeddings=4096,
                           max_position_embeddings=8192)
    llm = phi3.load(tmp_path, dtype="float32")
    prompt = _ids(4090, seed=4)
    assert len(prompt) > PREFILL_CHUNK
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                           attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    assert llm.generate(prompt, max_new_tokens=12).token_ids == out[0, len(prompt):].tolist()


def test_model_to_keeps_rope_frequencies_in_fp32_and_moves_the_tables(checkpoints):
    """`model.to(bf16)` after loading in fp32 gives the logits of a model loaded in bf16 (the rotary
    frequencies stay fp32, as the reference keeps them); tables already built move with `.to(device)`."""
    folder, _ = checkpoints["longrope"]
    ids = _ids(40, seed=9)
    direct = phi3.load(folder, dtype="bfloat16")
    cast = phi3.load(folder, dtype="float32")
    cast.logits(ids)  # tables built in fp32 first
    cast.model.to(torch.bfloat16)
    assert cast.model.rope.inv_freq.dtype == torch.float32
    assert torch.equal(cast.model.rope.inv_freq, direct.model.rope.inv_freq)
    assert torch.equal(cast.model(torch.tensor([ids])), direct.model(torch.tensor([ids])))
    rope = cast.model.rope
    rope.tables(64, torch.bfloat16)
    rope.to("meta")  # another device (no GPU here): the tables follow, with their dtype and length
    assert rope.inv_freq.device.type == rope.cos.device.type == rope.sin.device.type == "meta"
    assert rope.cos.dtype == torch.bfloat16 and rope.cos.shape[1] >= 64


def test_gqa_attention_with_query_heads_folded_into_rows_equals_transformers(checkpoints, monkeypatch):
    """Masked grouped-query attention as CUDA runs it (`_sdpa_grouped`: the query heads of each KV
    head folded into rows, so SDPA's memory-efficient kernel takes it without copying K/V), here on the
    CPU for every masked call: a batch of rows decoding past the 16-token window, 8 query heads on 2 KV
    heads, gives transformers' greedy tokens; and on random tensors it equals SDPA's own GQA."""
    import phi3.kernels
    import phi3.model as m
    from conftest import greedy_reference, random_ids
    from phi3.engine import Engine
    from phi3.sampling import SamplingParams

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 8, 5, 16, generator=g), torch.randn(3, 2, 40, 16, generator=g), torch.randn(3, 2, 40, 16, generator=g)
    mask = torch.rand(3, 1, 5, 40, generator=g) > 0.3
    mask[..., 0] = True  # every row sees a key
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert torch.allclose(m._sdpa_grouped(q, k, v, mask), expected, atol=1e-6, rtol=0)

    real, folded = m._sdpa, []

    def sdpa(q, k, v, mask):
        if isinstance(mask, torch.Tensor) and q.shape[1] != k.shape[1]:
            folded.append(q.shape[2])
            return m._sdpa_grouped(q, k, v, mask)
        return real(q, k, v, mask)

    monkeypatch.setattr(m, "_sdpa", sdpa)
    monkeypatch.setattr(phi3.kernels, "decode_layers", lambda *args: None)  # the torch layers, not the C ones
    folder, ref = checkpoints["gqa"]
    llm = phi3.load(folder, device="cpu", dtype="float32")
    engine = Engine(llm.model, slots=3, max_len=64)
    prompts = [random_ids(n, n) for n in (9, 30, 4)]
    rows = [engine.submit(p, SamplingParams(max_new_tokens=20)) for p in prompts]
    while engine.busy:
        engine.step()
    assert 1 in folded  # decode steps took the folded path
    for row, prompt in zip(rows, prompts):
        assert row.tokens == greedy_reference(ref, prompt, 20), len(prompt)
