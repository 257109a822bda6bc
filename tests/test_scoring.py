"""phi3.scoring.score against transformers, one sequence at a time, on tiny random checkpoints."""

from __future__ import annotations

import pytest
import torch

import phi3
from phi3.scoring import score


@pytest.mark.parametrize("kind", ["longrope", "gqa"])
def test_batched_scores_equal_transformers_alone(checkpoints, kind):
    """Pairs of many lengths in one call (LongRoPE: some past the 32-token pre-training context,
    so both factor sets; shared contexts; a repeated pair): each token's log-probability and
    greedy flag as transformers gives them for that sequence alone."""
    folder, ref = checkpoints[kind]
    llm = phi3.load(folder, device="cpu", dtype="float32")
    g = torch.Generator().manual_seed(1)
    ctx = torch.randint(0, 512, (40,), generator=g).tolist()
    pairs = [(ctx[:n], torch.randint(0, 512, (m,), generator=g).tolist()) for n, m in
             [(1, 5), (10, 1), (10, 1), (20, 3), (30, 2), (31, 4), (40, 7), (25, 30)]]
    pairs.append(pairs[0])
    got = score(llm, pairs, top=3)
    for (c, k), s in zip(pairs, got):
        seq = torch.tensor([c + k])
        with torch.no_grad():
            lp = torch.log_softmax(ref(seq).logits[0].float(), dim=-1)[len(c) - 1:-1]  # (len(k), V)
        want = lp.gather(1, torch.tensor(k)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(s.logprobs), want, atol=1e-4), (len(c), len(k))
        assert s.greedy == (lp.argmax(-1) == torch.tensor(k)).tolist()
        assert [t[0][0] for t in s.top] == lp.argmax(-1).tolist()
        assert s.total == pytest.approx(float(want.sum()), abs=1e-3)


def test_bad_pairs_are_value_errors(checkpoints):
    llm = phi3.load(checkpoints["gqa"][0], device="cpu", dtype="float32")
    for pairs, message in [([([], [1])], "at least one context token"), ([([1], [])], "at least one context token"),
                           ([([1] * 300, [2])], "truncate the context"), ([([1], [9999])], "token ids")]:
        with pytest.raises(ValueError, match=message):
            score(llm, pairs)
    with pytest.raises(ValueError, match="top"):
        score(llm, [([1], [2])], top=-1)


def _few_shot_pairs(g: torch.Generator) -> list[tuple[list[int], list[int]]]:
    """The shape of a 3-shot multiple choice: a shared 40-token prefix of examples, then per question
    its own tokens and four answers of 1-3 tokens; and one pair whose input is a prefix of another
    question's input but whose read positions start inside that input's full blocks (the cache must
    not serve them)."""
    shots = torch.randint(0, 512, (40,), generator=g).tolist()
    pairs = []
    for q in range(3):
        question = shots + torch.randint(0, 512, (7 + 5 * q,), generator=g).tolist()
        pairs += [(question, torch.randint(0, 512, (1 + a % 3,), generator=g).tolist()) for a in range(4)]
    long = pairs[-1][0] + pairs[-1][1]  # 3 full blocks and more
    pairs.append((long[:20], long[20:]))
    return pairs


@pytest.mark.parametrize("kind", ["gqa", "window", "longrope"])
def test_prefix_cache_hits_and_changes_no_score(checkpoints, kind):
    """Few-shot-shaped pairs: with the prefix cache the engine takes the shared blocks from it
    (prefix_hit_tokens) and computes fewer tokens than the inputs hold, and every log-probability,
    greedy flag and alternative is the one without the cache (fp32, 1e-5) and transformers' (1e-4)."""
    folder, ref = checkpoints[kind]
    llm = phi3.load(folder, device="cpu", dtype="float32", prefix_cache=False)
    pairs = _few_shot_pairs(torch.Generator().manual_seed(2))
    cold = score(llm, pairs, top=2)
    stats = llm.engine_for([]).stats()
    assert stats["prefix_hit_tokens"] == 0 and stats["computed_tokens"] == stats["prompt_tokens"]
    llm.prefix_cache = True
    warm = score(llm, pairs, top=2)
    stats = llm.engine_for([]).stats()
    assert stats["prefix_hit_tokens"] >= 2 * 9 * 16  # each answer after the first of a question: its 2+ shared blocks
    assert stats["computed_tokens"] == stats["prompt_tokens"] - stats["prefix_hit_tokens"]
    for (c, k), a, b in zip(pairs, cold, warm):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
        assert a.greedy == b.greedy and [[i for i, _ in t] for t in a.top] == [[i for i, _ in t] for t in b.top]
        with torch.no_grad():
            lp = torch.log_softmax(ref(torch.tensor([c + k])).logits[0].float(), dim=-1)[len(c) - 1:-1]
        assert torch.allclose(torch.tensor(b.logprobs), lp.gather(1, torch.tensor(k)[:, None])[:, 0], atol=1e-4)
    again = score(llm, pairs[:4])  # the first question again: every input's blocks before its answers are cached
    assert [x for s in again for x in s.logprobs] == pytest.approx([x for s in cold[:4] for x in s.logprobs], abs=1e-5)


def test_scoring_shares_the_engine_with_generation(checkpoints):
    """A score in the middle of a stream runs in the same engine: the stream's tokens are the ones
    it gets alone, and the scores are those of a fresh LLM."""
    folder, _ = checkpoints["gqa"]
    llm = phi3.load(folder, device="cpu", dtype="float32")
    prompt, pairs = list(range(1, 30)), _few_shot_pairs(torch.Generator().manual_seed(3))
    alone = llm.generate(prompt, max_new_tokens=12).token_ids
    stream = llm.stream(prompt, max_new_tokens=12)
    ids = list(next(stream).token_ids)
    engine = llm.engine_for([])
    mid = score(llm, pairs)
    assert llm.engine_for([]) is engine
    ids += [t for chunk in stream for t in chunk.token_ids]
    assert ids == alone
    fresh = score(phi3.load(folder, device="cpu", dtype="float32"), pairs)
    assert [x for s in mid for x in s.logprobs] == pytest.approx([x for s in fresh for x in s.logprobs], abs=1e-5)


def test_submit_reads_checks_its_positions(checkpoints):
    llm = phi3.load(checkpoints["gqa"][0], device="cpu", dtype="float32")
    engine = llm.engine_for([])
    for reads in ([], [3, 2], [1, 1], [-1], [5]):
        with pytest.raises(ValueError, match="reads must be"):
            engine.submit_reads([1, 2, 3, 4, 5], reads)


def test_a_preempted_scoring_request_reads_the_same_hidden_states(checkpoints):
    """A scoring request still prefilling (in chunks of 8) when a decoding row needs the pool's last
    block is the newest row, so it is preempted; it waits, resumes from the start of its unread
    positions, and ends with the hidden states it gets in a roomy pool, the decoding row with the
    tokens it gets alone."""
    from phi3.engine import Engine
    from phi3.sampling import SamplingParams

    llm = phi3.load(checkpoints["gqa"][0], device="cpu", dtype="float32")
    g = torch.Generator().manual_seed(5)
    prompt, ids = torch.randint(3, 512, (10,), generator=g).tolist(), torch.randint(3, 512, (60,), generator=g).tolist()
    reads = [0, 7, 8, 31, 32, 59]

    def run(tokens: int):
        engine = Engine(llm.model, slots=2, max_len=128, kv_cache_tokens=tokens, prefill_chunk=8, prefix_cache=False)
        row = engine.submit(prompt, SamplingParams(max_new_tokens=60))
        while not row.tokens:
            engine.step()
        scoring = engine.submit_reads(ids, reads)
        while engine.busy:
            engine.step()
        return row, scoring

    (row, tight), (alone, roomy) = run(5 * 16), run(16 * 16)
    assert tight.preemptions > 0 and roomy.preemptions == 0
    assert tight.finish_reason == roomy.finish_reason == "scored"
    assert torch.allclose(torch.as_tensor(tight.hidden), torch.as_tensor(roomy.hidden), atol=1e-5)
    assert row.tokens == alone.tokens == llm.generate(prompt, max_new_tokens=60).token_ids
