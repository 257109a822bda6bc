"""Speculative decoding by prompt lookup: the same tokens as without it, against transformers and
against our own plain engine, whatever the guesses: all accepted, none accepted, stops, lengths and
the LongRoPE switch inside an accepted guess, seeded sampling, the penalty and logprobs, rows with
and without guesses in one batch, preemption, the C step against the torch step, packed weights.

A windowed tiny model (window 8, 2 layers) sees at most its last 15 tokens, and RoPE makes its
output depend on relative positions only: after P + G + P, where G is its greedy continuation of P
(P longer than 15 tokens), it writes G again, which prompt lookup guesses from the first P onward.
"""

from __future__ import annotations

import time

import pytest
import torch

import phi3
import phi3.kernels
from conftest import greedy_reference as _reference, random_ids as _ids, write_checkpoint
from phi3.engine import Engine
from phi3.sampling import SamplingParams


def _run(engine: Engine, work, stop_ids=frozenset()) -> list:
    """Submit (prompt, params) pairs at once, step until done; the requests, each with the tokens
    its events carried (`streamed`)."""
    reqs = [engine.submit(p, q, stop_ids) for p, q in work]
    for r in reqs:
        r.streamed = []
    while engine.busy:
        for event in engine.step():
            if event.token is not None:
                event.request.streamed.append(event.token)
    for r in reqs:
        assert r.streamed == r.tokens  # every token reported once, in order, none past the end
    return reqs


def _spec(params: SamplingParams, speculate: str) -> SamplingParams:
    from dataclasses import replace

    return replace(params, speculate=speculate)


@pytest.fixture(scope="module")
def models(checkpoints):
    return {kind: (phi3.load(checkpoints[kind][0], device="cpu", dtype="float32"), checkpoints[kind][1])
            for kind in ("longrope", "window", "gqa")}


@pytest.fixture(scope="module")
def echo(models):
    """(prompt P + G + P, G): the windowed model continues it with G, which prompt lookup guesses."""
    llm, ref = models["window"]
    p = _ids(20, seed=5)
    g = _reference(ref, p, 40)
    return p + g + p, g


@pytest.mark.parametrize("kind", ["window", "gqa", "longrope"])
def test_rows_with_and_without_guesses_give_transformers_tokens(models, kind):
    """A batch of rows, some speculating (prompts that repeat themselves, so lookup guesses), some
    not: every row gets transformers' greedy tokens."""
    llm, ref = models[kind]
    prompts = []
    for k in range(4):
        x = _ids(10, seed=k)
        prompts.append(x + _ids(5, seed=100 + k) + x + x[:3])
    work = [(p, SamplingParams(max_new_tokens=40, speculate="ngram:4" if k % 3 else None))
            for k, p in enumerate(prompts)]
    engine = Engine(llm.model, slots=4, max_len=128)
    reqs = _run(engine, work)
    assert engine.stats()["draft_tokens"] > 0
    for r in reqs:
        assert r.tokens == _reference(ref, r.prompt, 40)
    assert reqs[0].drafted == reqs[3].drafted == 0


def test_every_guess_accepted(models, echo):
    """Guesses that are all right: k + 1 tokens per verify step, transformers' tokens."""
    llm, ref = models["window"]
    prompt, g = echo
    engine = Engine(llm.model, slots=2, max_len=128)
    req, = _run(engine, [(prompt, SamplingParams(max_new_tokens=30, speculate="ngram:5"))])
    assert req.tokens == g[:30] == _reference(ref, prompt, 30)
    assert req.drafted >= 20 and req.accepted == req.drafted  # 30 tokens: 1 from the prefill, then up to 6 a step


def test_no_guess_accepted(models, echo):
    """Guesses that are all wrong (the prompt repeats a continuation the model does not write):
    the row still gets transformers' tokens, and backs off from guessing."""
    llm, ref = models["window"]
    p, g = echo[0][:20], echo[1]
    wrong = [(t + 1) % 60 + 3 for t in g[:12]]  # another continuation, the model's never
    prompt = p + wrong + p
    engine = Engine(llm.model, slots=1, max_len=128)
    req, = _run(engine, [(prompt, SamplingParams(max_new_tokens=30, speculate="ngram:5"))])
    assert req.tokens == _reference(ref, prompt, 30)
    assert req.drafted > 0 and req.accepted == 0


def test_stops_and_lengths_inside_an_accepted_guess(models, echo):
    """A stop id or max_new_tokens falling inside an accepted guess ends the row where plain
    decoding ends it: no token past it, the same finish reason."""
    llm, _ = models["window"]
    prompt, g = echo
    j = next(i for i in range(4, len(g)) if g[i] not in g[:i])  # a token met first at step j (mid-guess)
    for params, stops in [(SamplingParams(max_new_tokens=30), frozenset({g[j]})),
                          (SamplingParams(max_new_tokens=9), frozenset())]:
        plain, = _run(Engine(llm.model, slots=1, max_len=128), [(prompt, params)], stops)
        spec, = _run(Engine(llm.model, slots=1, max_len=128), [(prompt, _spec(params, "ngram:5"))], stops)
        assert spec.tokens == plain.tokens
        assert spec.finish_reason == plain.finish_reason
        assert spec.accepted > 0
    assert plain.tokens == g[:9] and spec.finish_reason == "length"


def test_seeded_sampling_penalty_and_logprobs_are_unchanged(models, echo):
    """Sampled rows draw the same tokens with speculation as without (the draw at each position
    is the plain step's: same seed, same step), with the penalty counting guessed tokens seen,
    and the same log-probabilities."""
    llm, _ = models["window"]
    prompt, _ = echo
    options = [dict(temperature=0.7, seed=1), dict(temperature=1.2, top_k=20, top_p=0.9, seed=2),
               dict(repetition_penalty=1.3), dict(temperature=0.8, repetition_penalty=1.2, seed=3), {}]
    work = [(prompt, SamplingParams(max_new_tokens=24, logprobs=3, **o)) for o in options]
    plain = _run(Engine(llm.model, slots=5, max_len=128), work)
    engine = Engine(llm.model, slots=5, max_len=128)
    spec = _run(engine, [(p, _spec(q, "ngram:4")) for p, q in work])
    assert engine.stats()["accepted_tokens"] > 0
    for a, b in zip(spec, plain):
        assert a.tokens == b.tokens
        assert max(abs(x[0] - y[0]) for x, y in zip(a.logprobs, b.logprobs)) < 1e-5
        assert [[i for i, _ in x[1]] for x in a.logprobs] == [[i for i, _ in y[1]] for y in b.logprobs]


def test_the_longrope_switch_inside_an_accepted_guess(tmp_path):
    """A guess accepted across the pre-training context: the row stops at the token that crosses
    it and is prefilled again with the long factors, as plain decoding does (transformers' tokens).
    One windowed layer sees 8 tokens, so after Q + X + Q it writes X again (X its continuation of Q
    with the short factors)."""
    ref = write_checkpoint(tmp_path, "longrope", num_hidden_layers=1, sliding_window=8)
    llm = phi3.load(tmp_path, device="cpu", dtype="float32")
    q = _ids(8, seed=9)
    x = _reference(ref, q, 10)  # 18 tokens: short factors throughout
    prompt = q + x + q  # 26 tokens: the 7th new token makes 33, past the 32 of pre-training
    engine = Engine(llm.model, slots=1, max_len=64)
    req, = _run(engine, [(prompt, SamplingParams(max_new_tokens=20, speculate="ngram:8"))])
    assert req.tokens == _reference(ref, prompt, 20)
    assert req.tokens[:6] == x[:6] and req.accepted >= 5  # the guess was taken up to the switch


def test_preemption_while_speculating(models):
    """A pool too small for every row: preempted speculating rows resume with the same tokens."""
    llm, ref = models["gqa"]
    work = []
    for k in range(5):
        x = _ids(12, seed=30 + k)
        params = SamplingParams(max_new_tokens=40, speculate="ngram:6", **({"temperature": 0.9, "seed": k} if k % 2 else {}))
        work.append((x + x + x[:4], params))
    alone = [_run(Engine(llm.model, slots=1, max_len=128), [(p, _spec(q, None))])[0].tokens for p, q in work]
    tight = Engine(llm.model, slots=5, max_len=128, kv_cache_tokens=10 * 16)
    reqs = _run(tight, work)
    assert tight.preempted > 0
    assert [r.tokens for r in reqs] == alone
    assert alone[0] == _reference(ref, work[0][0], 40)


@pytest.mark.parametrize("quantize", [None, "int4"])
def test_c_step_equals_torch_step(checkpoints, ran_in_c, monkeypatch, quantize):
    """The C decode step takes a verify step (several positions of one row) as the torch step does:
    same tokens and log-probabilities, fp32 and packed int4 weights."""
    llm = phi3.load(checkpoints["window"][0], device="cpu", dtype="float32", quantize=quantize)
    p = _ids(20, seed=5)
    prompt = p + llm.generate(p, max_new_tokens=40).token_ids + p  # this model's own echo (see above)
    ran_in_c.clear()
    work = [(prompt, SamplingParams(max_new_tokens=24, logprobs=3, speculate="ngram:5")),
            (prompt[:30], SamplingParams(max_new_tokens=24, logprobs=3))]
    in_c = _run(Engine(llm.model, slots=2, max_len=128), work)
    assert ran_in_c and all(ran_in_c) and in_c[0].accepted > 0
    monkeypatch.setattr(phi3.kernels, "decode_layers", lambda *a, **k: None)  # the torch step, everywhere
    in_torch = _run(Engine(llm.model, slots=2, max_len=128), work)
    plain = _run(Engine(llm.model, slots=2, max_len=128), [(p, _spec(q, None)) for p, q in work])
    for a, b, c in zip(in_c, in_torch, plain):
        assert a.tokens == b.tokens == c.tokens
        assert max(abs(x[0] - y[0]) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4


def test_compiled_verify_step_equals_eager(models, echo):
    """A compiled engine pads verify steps to fixed shapes (as CUDA graphs do): the same tokens."""
    llm, _ = models["window"]
    prompt, _ = echo
    work = [(prompt, SamplingParams(max_new_tokens=20, speculate="ngram:3")),
            (prompt[5:], SamplingParams(max_new_tokens=20, temperature=0.8, seed=4, speculate="ngram:5"))]
    eager = _run(Engine(llm.model, slots=2, max_len=128), work)
    compiled = _run(Engine(llm.model, slots=2, max_len=128, compile=True), work)
    assert [r.tokens for r in compiled] == [r.tokens for r in eager]
    assert compiled[0].accepted > 0


def test_the_library_call(models, echo):
    """`LLM.generate(..., speculate=...)`: the same completion as without."""
    llm, _ = models["window"]
    prompt, _ = echo
    assert llm.generate(prompt, max_new_tokens=20, speculate="ngram").token_ids == \
        llm.generate(prompt, max_new_tokens=20).token_ids


@pytest.mark.parametrize("bad", ["ngram:0", "ngram:33", "ngram:4:0", "ngram:x", "ngram:4:2:1", 3, "layers:0", "layers:x",
                                 "layers:", "layers:1:2:3", "layers:2:0", "draft-model:0", "draft-model:33", " "])
def test_bad_speculation_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="speculate must be"):
        SamplingParams(speculate=bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_verify_step_equals_eager(checkpoints):
    """The verify step captured per padded size (CUDA graphs) gives the eager step's tokens and
    accepts guesses; the eager CUDA step gives transformers' greedy tokens."""
    folder, ref = checkpoints["window"]
    llm = phi3.load(folder, device="cuda", dtype="float32")
    p = _ids(20, seed=5)
    g = _reference(ref, p, 40)
    work = [(p + g + p, SamplingParams(max_new_tokens=20, speculate="ngram:4")),
            (p + g + p[:12], SamplingParams(max_new_tokens=20, temperature=0.8, seed=3, speculate="ngram:5"))]
    graphs = _run(Engine(llm.model, slots=2, max_len=128, cuda_graphs=True), work)
    eager = _run(Engine(llm.model, slots=2, max_len=128, cuda_graphs=False), work)
    assert [r.tokens for r in graphs] == [r.tokens for r in eager]
    assert graphs[0].tokens == g[:20] and graphs[0].accepted > 0


# -- draft models -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,draft", [("gqa", "itself"), ("gqa", "layers:1"), ("window", "layers:1:6"),
                                        ("longrope", "another checkpoint")])
def test_draft_models_give_transformers_tokens(models, checkpoints, kind, draft):
    """Rows drafted by a draft model (the model itself: every guess right; its own first layer; another
    checkpoint of the same vocabulary, loaded by name, whose guesses are mostly wrong) beside rows
    drafted by prompt lookup and plain rows, in one batch: every row gets transformers' greedy tokens;
    the longrope rows cross 32 tokens (the factor switch) while speculating."""
    llm, ref = models[kind]
    spec = {"itself": llm, "another checkpoint": f"{checkpoints['sharded'][0]}:3"}.get(draft, draft)
    prompts = [_ids(n, seed=n) for n in (12, 20, 7, 16)]
    work = [(p, SamplingParams(max_new_tokens=36, speculate=s)) for p, s in zip(prompts, [spec, "ngram:4", None, spec])]
    engine = llm.engine_for([(len(p), q) for p, q in work])
    drafted, accepted = engine.draft_tokens, engine.accepted_tokens
    reqs = _run(engine, work)
    for r in reqs:
        assert r.tokens == _reference(ref, r.prompt, 36)
    assert reqs[2].drafted == 0 and reqs[0].drafted > 0 and reqs[3].drafted > 0
    if draft == "itself":
        assert reqs[0].accepted == reqs[0].drafted and reqs[3].accepted == reqs[3].drafted
    assert engine.draft_tokens - drafted == sum(r.drafted for r in reqs)
    assert engine.accepted_tokens - accepted == sum(r.accepted for r in reqs)


def test_draft_model_seeded_sampling_and_logprobs_are_unchanged(models, checkpoints):
    """Sampled rows with a draft model (a second copy of the model: its first step's guesses are
    drafted before any time is measured) draw what they draw without it (the same seed, the same
    step's noise), with the same log-probabilities; the draft's guesses are greedy."""
    llm, _ = models["gqa"]
    draft = phi3.load(checkpoints["gqa"][0], device="cpu", dtype="float32")
    prompt = _ids(14, seed=9)
    options = [dict(temperature=0.7, seed=1), dict(temperature=1.1, top_k=30, seed=2), dict(repetition_penalty=1.2)]
    work = [(prompt, SamplingParams(max_new_tokens=24, logprobs=2, **o)) for o in options]
    plain = _run(Engine(llm.model, slots=3, max_len=128), work)
    engine = llm.engine_for([(len(prompt), q) for _, q in work])
    spec = _run(engine, [(p, _spec(q, draft)) for p, q in work])
    for a, b in zip(spec, plain):
        assert a.tokens == b.tokens
        assert max(abs(x[0] - y[0]) for x, y in zip(a.logprobs, b.logprobs)) < 1e-5
    assert sum(r.accepted for r in spec) > 0


@pytest.mark.parametrize("quantize", [None, "int4"])
def test_draft_model_c_step_equals_torch_step(checkpoints, ran_in_c, monkeypatch, quantize):
    """With a draft model (its own first layer) the target's verify steps and the draft's decode
    steps run in C, and give the torch step's tokens and log-probabilities, fp32 and packed int4."""
    llm = phi3.load(checkpoints["gqa"][0], device="cpu", dtype="float32", quantize=quantize)
    work = [(_ids(18, seed=2), SamplingParams(max_new_tokens=24, logprobs=3, speculate="layers:1:3")),
            (_ids(9, seed=3), SamplingParams(max_new_tokens=24, logprobs=3))]
    ran_in_c.clear()
    in_c = _run(llm.engine_for([(18, work[0][1])]), work)
    assert ran_in_c and all(ran_in_c) and in_c[0].drafted > 0
    monkeypatch.setattr(phi3.kernels, "decode_layers", lambda *a, **k: None)  # the torch step, everywhere
    llm._engine = None
    in_torch = _run(llm.engine_for([(18, work[0][1])]), work)
    plain = _run(Engine(llm.model, slots=2, max_len=128), [(p, _spec(q, None)) for p, q in work])
    for a, b, c in zip(in_c, in_torch, plain):
        assert a.tokens == b.tokens == c.tokens
        assert max(abs(x[0] - y[0]) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4


def test_bad_draft_models_are_clear_errors_before_any_work(checkpoints, tmp_path, monkeypatch):
    """A draft of another vocabulary, one deeper than the model's own layers, one that is not there,
    one that does not fit in memory: a ValueError (OSError for a missing file) naming it, raised
    before any token is generated."""
    llm = phi3.load(checkpoints["gqa"][0], device="cpu", dtype="float32")
    write_checkpoint(tmp_path / "other-vocab", "gqa", vocab_size=600)
    prompt = _ids(10, seed=1)
    cases = [(str(tmp_path / "other-vocab"), ValueError, "vocabulary of 600 tokens, the model 512"),
             ("layers:2", ValueError, "1 <= N < 2"),
             (str(tmp_path / "missing"), (ValueError, OSError), "missing")]
    for spec, error, message in cases:
        with pytest.raises(error, match=message):
            llm.generate(prompt, max_new_tokens=4, speculate=spec)
    assert not llm.engine_for([(10, SamplingParams())]).busy
    monkeypatch.setattr(phi3.engine, "free_memory", lambda device: 1000)  # what the system says is free
    with pytest.raises(ValueError, match="does not fit"):
        llm.generate(prompt, max_new_tokens=4, speculate=str(checkpoints["window"][0]))
    with pytest.raises(ValueError, match="layers:1 does not fit"):
        llm.generate(prompt, max_new_tokens=4, speculate="layers:1")


def test_a_draft_that_does_not_pay_is_turned_off(models, checkpoints):
    """A draft model whose steps cost far more than the guesses can save (here: 50 ms a forward, against
    milliseconds for the tiny model's step) drafts at the first step, then each row asks it again only
    after a pause long enough that such probes cost ~3% of the time (more than the 40 tokens here); the
    tokens are the plain ones throughout."""
    llm, ref = models["gqa"]
    slow = phi3.load(checkpoints["gqa"][0], device="cpu", dtype="float32")
    slow.model.register_forward_pre_hook(lambda *_: time.sleep(0.05))
    prompts = [_ids(12, seed=31), _ids(15, seed=32)]
    work = [(p, SamplingParams(max_new_tokens=40, speculate=slow)) for p in prompts]  # an LLM: 4 guesses a step
    engine = llm.engine_for([(len(p), q) for p, q in work])
    reqs = _run(engine, work)
    for r in reqs:
        assert r.tokens == _reference(ref, r.prompt, 40)
        assert r.drafted == 4, r.drafted  # the first step's draft only

