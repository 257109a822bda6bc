"""The CUDA paths against transformers (fp32): skipped without a GPU; bench/gpu.sh runs them on one."""

from __future__ import annotations

import pytest
import torch

import phi3
from conftest import greedy_reference, random_ids as _ids
from phi3.cache import KVCache
from phi3.engine import Engine
from phi3.sampling import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("kind", ["longrope", "window", "gqa"])
def test_cuda_logits_match_transformers(checkpoints, kind):
    folder, ref = checkpoints[kind]
    llm = phi3.load(folder, device="cuda", dtype="float32")
    for n in (9, 40, 70):
        ids = _ids(n, n)
        with torch.no_grad():
            theirs = ref(torch.tensor([ids])).logits[0]
        assert torch.allclose(llm.logits(ids).cpu(), theirs, atol=1e-4, rtol=0), (kind, n)


@pytest.mark.parametrize("kind", ["longrope", "gqa"])
def test_cuda_chunked_prefill_with_lower_right_causal_equals_one_pass(checkpoints, kind):
    """Chunks after a prefix take SDPA's lower-right causal path (flash kernels on CUDA)."""
    folder, _ = checkpoints[kind]
    llm = phi3.load(folder, device="cuda", dtype="float32")
    ids = _ids(60, 3)
    cache = KVCache(llm.config, 1, 64, torch.float32, "cuda")
    with torch.inference_mode():
        for start in range(0, 60, 16):
            chunk = ids[start:start + 16]
            end = start + len(chunk)
            cache.long_rope[0] = llm.model.uses_long_rope(60)
            logits = llm.model(torch.tensor([chunk], device="cuda"), torch.arange(start, end, device="cuda")[None],
                               cache, kv_len=end)[0]
            full = llm.model(torch.tensor([ids[:end]], device="cuda"), long_rope=llm.model.uses_long_rope(60))[0]
            assert torch.allclose(logits, full[start:end], atol=1e-4, rtol=0), start


def test_cuda_graph_batches_equal_transformers_per_row(checkpoints):
    folder, ref = checkpoints["longrope"]
    llm = phi3.load(folder, device="cuda", dtype="float32")
    rows = [(20, 60), (5, 24), (40, 50), (12, 22)]
    prompts = [_ids(n, n) for n, _ in rows]
    engine = Engine(llm.model, slots=4, max_len=128, cuda_graphs=True)
    reqs = [engine.submit(p, SamplingParams(max_new_tokens=new)) for p, (_, new) in zip(prompts, rows)]
    while engine.busy:
        engine.step()
    for req, prompt, (n, new) in zip(reqs, prompts, rows):
        assert req.tokens == greedy_reference(ref, prompt, new), n
    assert len(engine._graphs) >= 2  # several (batch, length) buckets were captured and replayed


def test_cuda_graphs_with_a_long_row_beside_short_ones(checkpoints):
    """A long row and seven short ones: captured steps whose short rows read only their own keys
    (two attention parts, the order a device tensor the graphs read) give transformers' tokens."""
    folder, ref = checkpoints["longrope"]
    llm = phi3.load(folder, device="cuda", dtype="float32")
    work = [(_ids(190, 90), 24)] + [(_ids(8 + 4 * k, 91 + k), 20) for k in range(7)]
    engine = Engine(llm.model, slots=8, max_len=256, cuda_graphs=True)
    reqs = [engine.submit(p, SamplingParams(max_new_tokens=n)) for p, n in work]
    while engine.busy:
        engine.step()
    for req, (prompt, new) in zip(reqs, work):
        assert req.tokens == greedy_reference(ref, prompt, new), len(prompt)
    assert any(len(key[2]) == 2 for key in engine._graphs), list(engine._graphs)  # a two-part step was captured


@pytest.mark.parametrize("kind", ["longrope", "gqa"])
def test_cuda_bf16_greedy_tokens_match_transformers(checkpoints, kind):
    """bf16 on the GPU, the dtype a real Phi-3 loads in there: the greedy tokens of transformers in
    bf16 on the same device (the tiny models' logits are well separated: no near-ties to flip)."""
    folder, ref = checkpoints[kind]
    theirs = type(ref).from_pretrained(folder, dtype=torch.bfloat16).to("cuda").eval()
    llm = phi3.load(folder, device="cuda", dtype="bfloat16")
    engine = Engine(llm.model, slots=2, max_len=128)
    prompts = [_ids(n, n) for n in (11, 30)]
    reqs = [engine.submit(p, SamplingParams(max_new_tokens=12)) for p in prompts]
    while engine.busy:
        engine.step()
    for req, prompt in zip(reqs, prompts):
        assert req.tokens == greedy_reference(theirs, prompt, 12), (kind, len(prompt))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_gqa_attention_runs_on_fused_kernels(checkpoints, dtype):
    """Grouped-query attention (8 query heads on 2 KV heads, a 16-token window) with SDPA's math
    backend switched off, so that any call needing it raises: prefill, windowed chunks and every
    decode step run on flash or memory-efficient kernels, and give transformers' greedy tokens."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    folder, ref = checkpoints["gqa"]
    torch_dtype = getattr(torch, dtype)
    theirs = type(ref).from_pretrained(folder, dtype=torch_dtype).to("cuda").eval()
    llm = phi3.load(folder, device="cuda", dtype=dtype)
    prompts = [_ids(n, n) for n in (11, 30)]
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        engine = Engine(llm.model, slots=2, max_len=128)
        reqs = [engine.submit(p, SamplingParams(max_new_tokens=24)) for p in prompts]
        while engine.busy:
            engine.step()
    for req, prompt in zip(reqs, prompts):
        assert req.tokens == greedy_reference(theirs, prompt, 24), (dtype, len(prompt))
