"""The batched engine: rows decoded together give each row's own tokens (transformers' for greedy),
LongRoPE per row, seeded rows independent of their neighbours, queuing, cancelling, bad input."""

from __future__ import annotations

import pytest
import torch

import phi3
from conftest import greedy_reference as _reference, random_ids as _ids
from phi3.engine import Engine
from phi3.sampling import SamplingParams




@pytest.fixture(scope="module")
def longrope(checkpoints):
    folder, ref = checkpoints["longrope"]
    return phi3.load(folder, device="cpu", dtype="float32"), ref


# The LongRoPE model's pre-training context is 32 tokens: the 20-token row crosses it while the
# others decode (5: stays short; 40: long from its prompt on; 12: crosses late, ends early).
PROMPTS = [(20, 60), (5, 24), (40, 50), (12, 22)]


def test_batched_greedy_rows_equal_transformers_per_row(longrope):
    llm, ref = longrope
    prompts = [_ids(n, seed=n) for n, _ in PROMPTS]
    params = [SamplingParams(max_new_tokens=new) for _, new in PROMPTS]
    done = llm.generate(prompts, params)
    assert len(done) == len(prompts)
    for (n, new), prompt, completion in zip(PROMPTS, prompts, done):
        assert completion.token_ids == _reference(ref, prompt, new), n
        assert completion.finish_reason == "length"
        assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (n, new)


def test_a_row_stopping_early_leaves_the_others_alone(longrope):
    llm, _ = longrope
    prompts = [_ids(n, seed=n) for n, _ in PROMPTS]
    free = llm.generate(prompts, max_new_tokens=30)
    stopper = free[1].token_ids[4]  # the 5-token row's 5th new token ends generation
    stopping = phi3.load(llm.name, device="cpu", dtype="float32")
    stopping.stop_ids = {stopper}
    batched = stopping.generate(prompts, max_new_tokens=30)
    for prompt, row, alone in zip(prompts, batched, free):
        expected = alone.token_ids[: alone.token_ids.index(stopper)] if stopper in alone.token_ids else alone.token_ids
        assert row.token_ids == expected
        assert row.finish_reason == ("stop" if stopper in alone.token_ids else "length")
        assert row.token_ids == stopping.generate(prompt, max_new_tokens=30).token_ids
    assert batched[1].finish_reason == "stop" and len(batched[1].token_ids) <= 4


def test_mixed_options_and_seeds_do_not_depend_on_the_batch(longrope):
    """Each row's tokens equal the same request alone, and with other neighbours."""
    llm, _ = longrope
    rows = [
        (_ids(9, 1), SamplingParams(max_new_tokens=40, temperature=1.0, top_p=0.9, seed=7)),
        (_ids(30, 2), SamplingParams(max_new_tokens=25)),
        (_ids(14, 3), SamplingParams(max_new_tokens=35, temperature=0.8, top_k=20, min_p=0.02,
                                     repetition_penalty=1.3, seed=11)),
        (_ids(6, 4), SamplingParams(max_new_tokens=30, repetition_penalty=1.5)),
        (_ids(22, 5), SamplingParams(max_new_tokens=20, temperature=1.5, seed=3)),
    ]
    alone = [llm.generate(p, params).token_ids for p, params in rows]
    together = llm.generate([p for p, _ in rows], [params for _, params in rows])
    assert [c.token_ids for c in together] == alone
    shuffled = [rows[4], rows[0], rows[2]]  # other neighbours, other slots
    assert [c.token_ids for c in llm.generate([p for p, _ in shuffled], [q for _, q in shuffled])] == \
        [alone[4], alone[0], alone[2]]
    assert alone[0] != llm.generate(rows[0][0], max_new_tokens=40).token_ids  # sampling is not greedy


def test_more_prompts_than_slots_wait_for_a_free_slot(longrope):
    llm, _ = longrope
    prompts = [_ids(4 + 3 * k, seed=20 + k) for k in range(7)]
    alone = [llm.generate(p, max_new_tokens=12 + k).token_ids for k, p in enumerate(prompts)]
    small = phi3.load(llm.name, device="cpu", dtype="float32")
    small.max_batch = 2
    done = small.generate(prompts, [SamplingParams(max_new_tokens=12 + k) for k in range(7)])
    assert [c.token_ids for c in done] == alone
    assert small.engine_for([(4, SamplingParams())]).slots == 2


def test_engine_rows_join_and_leave_between_steps(longrope):
    """Requests submitted while others decode (continuous batching) get their own tokens."""
    llm, ref = longrope
    engine = Engine(llm.model, slots=3, max_len=128, prefill_chunk=8)
    first = engine.submit(_ids(20, 20), SamplingParams(max_new_tokens=40))
    for _ in range(6):
        engine.step()
    late = engine.submit(_ids(12, 12), SamplingParams(max_new_tokens=20))
    third = engine.submit(_ids(40, 40), SamplingParams(max_new_tokens=10))
    while engine.busy:
        engine.step()
    for req, (n, new) in ((first, (20, 40)), (late, (12, 20)), (third, (40, 10))):
        assert req.tokens == _reference(ref, _ids(n, n), new)
    assert engine.requests == {} and engine._free == [0, 1, 2]


def test_cancel_frees_the_slot(longrope):
    llm, _ = longrope
    engine = Engine(llm.model, slots=1, max_len=64)
    tokens = engine.generate_step(_ids(10, 1), SamplingParams(max_new_tokens=40))
    got = [next(tokens) for _ in range(3)]
    tokens.close()
    assert engine.requests == {} and not engine.busy
    again = list(engine.generate_step(_ids(10, 1), SamplingParams(max_new_tokens=40)))
    assert again[:3] == got and len(again) == 40


def _graphs_compiled() -> int:
    """How many graphs dynamo has compiled in this process (a compiled step that fell back to eager,
    or was never called, adds none)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def test_compiled_step_equals_eager(longrope):
    llm, _ = longrope
    prompt, params = _ids(20, 5), SamplingParams(max_new_tokens=24)
    eager = list(Engine(llm.model, slots=2, max_len=64).generate_step(prompt, params))
    before = _graphs_compiled()
    compiled = list(Engine(llm.model, slots=2, max_len=64, compile=True).generate_step(prompt, params))
    assert compiled == eager
    assert _graphs_compiled() > before


def test_compiled_step_with_packed_weights_equals_eager(checkpoints):
    """phi3's CPU kernels for packed weights are opaque ops inside the compiled step."""
    llm = phi3.load(checkpoints["longrope"][0], dtype="float32", quantize="int4")
    assert llm.model.model.layers[0].mlp.gate_up_proj.kernel == ("cpu-fp32" if llm.device.type == "cpu" else "dense")
    prompt, params = _ids(20, 5), SamplingParams(max_new_tokens=24)
    eager = list(Engine(llm.model, slots=2, max_len=64).generate_step(prompt, params))
    before = _graphs_compiled()
    compiled = list(Engine(llm.model, slots=2, max_len=64, compile=True).generate_step(prompt, params))
    assert compiled == eager
    assert _graphs_compiled() > before


def test_captured_steps_are_dropped_when_the_weights_change(checkpoints, monkeypatch):
    """CUDA graphs' bookkeeping, on the CPU with the capture stubbed (a "graph" that replays the eager
    step and counts captures): each shape is captured once and then replayed; a longer forward
    outside the engine leaves the engine's RoPE tables alone (it owns them: a graph holds their
    addresses); a weight written in place drops the captured steps, so the next request captures
    again and gives the new weights' tokens, those of a fresh engine."""
    llm = phi3.load(checkpoints["longrope"][0], device="cpu", dtype="float32")  # its own copy: weights change
    engine = Engine(llm.model, slots=2, max_len=64)
    captured = []

    class Replay:
        def __init__(self, body, shape):
            self.body, self.shape = body, shape

        def replay(self):
            with torch.inference_mode():
                self.body(*self.shape)

    def capture(body, shape):
        captured.append(shape)
        return Replay(body, shape)

    monkeypatch.setattr(engine, "_capture", capture)
    engine.cuda_graphs = True
    prompt, params = _ids(20, 5), SamplingParams(max_new_tokens=8)
    first = list(engine.generate_step(prompt, params))
    n, tables = len(captured), (engine.cache.cos, engine.cache.sin)
    assert n >= 1
    llm.logits(_ids(200, 1))  # longer than any table the model built so far: its own tables are rebuilt
    assert engine.cache.cos is tables[0] and engine.cache.sin is tables[1]
    assert list(engine.generate_step(prompt, params)) == first and len(captured) == n  # replayed, not captured
    with torch.no_grad():
        llm.model.lm_head.weight.mul_(-1)
    flipped = list(engine.generate_step(prompt, params))
    assert len(captured) > n and flipped != first
    assert flipped == list(Engine(llm.model, slots=2, max_len=64).generate_step(prompt, params))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_step_equals_eager(checkpoints):
    folder, ref = checkpoints["longrope"]
    llm = phi3.load(folder, device="cuda", dtype="float32")
    prompts = [_ids(n, seed=n) for n, _ in PROMPTS]
    params = [SamplingParams(max_new_tokens=new, temperature=0.7 * (k % 2), seed=k) for k, (_, new) in enumerate(PROMPTS)]
    graphs = Engine(llm.model, slots=4, max_len=128, cuda_graphs=True)
    eager = Engine(llm.model, slots=4, max_len=128, cuda_graphs=False)
    for engine in (graphs, eager):
        reqs = [engine.submit(p, q) for p, q in zip(prompts, params)]
        while engine.busy:
            engine.step()
        engine.result = [r.tokens for r in reqs]
    assert graphs.result == eager.result
    assert graphs.result[0] == _reference(ref, prompts[0], PROMPTS[0][1])


def test_bad_batches_and_sizes_are_refused_clearly(longrope):
    llm, _ = longrope
    with pytest.raises(ValueError, match="empty"):
        llm.generate([])
    with pytest.raises(ValueError, match="context is 256"):
        llm.generate([[5] * 10, [5] * 300])
    with pytest.raises(ValueError, match="one per prompt"):
        llm.generate([[5], [6]], [SamplingParams()])
    with pytest.raises(ValueError, match="GiB"):
        Engine(llm.model, slots=10**9, max_len=256)
    with pytest.raises(ValueError, match="max_len"):
        Engine(llm.model, slots=1, max_len=257)
    with pytest.raises(ValueError, match="slots"):
        Engine(llm.model, slots=0, max_len=64)
    with pytest.raises(ValueError, match="cuda_graphs"):
        Engine(llm.model, slots=1, max_len=64, cuda_graphs=True)  # the model is on the CPU


def test_logprobs_are_the_models_own(longrope):
    """Each drawn token's log-probability (and the top alternatives) equal log_softmax of the
    full-sequence logits at that position; rows that did not ask get none."""
    llm, _ = longrope
    engine = Engine(llm.model, slots=2, max_len=128)
    asking = engine.submit(_ids(20, 30), SamplingParams(max_new_tokens=20, temperature=0.9, seed=5, logprobs=3))
    quiet = engine.submit(_ids(7, 31), SamplingParams(max_new_tokens=20))
    while engine.busy:
        engine.step()
    assert quiet.logprobs == [] and len(asking.logprobs) == len(asking.tokens) == 20
    sequence = asking.prompt + asking.tokens
    logp = llm.logits(sequence).log_softmax(-1)  # crosses the 32-token context: long factors throughout
    for k, (token, (lp, top)) in enumerate(zip(asking.tokens, asking.logprobs)):
        # tokens before the crossing were drawn from short-factor logits: recompute those on the prefix
        row = logp[len(asking.prompt) + k - 1] if len(asking.prompt) + k > 32 else \
            llm.logits(sequence[: len(asking.prompt) + k]).log_softmax(-1)[-1]
        assert abs(lp - row[token].item()) < 1e-4
        assert [i for i, _ in top] == row.topk(3).indices.tolist()
        assert all(abs(v - row[i].item()) < 1e-4 for i, v in top)
