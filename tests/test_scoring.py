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
