"""The paged KV cache and automatic prefix caching: every row's tokens are transformers' greedy
ones (and the same with the prefix cache off), whatever the pool's pressure: hits and misses,
partial-block tails, eviction, preemption and resume, the LongRoPE switch and the sliding window
inside a batch, the C decode step against the torch step."""

from __future__ import annotations

import pytest
import torch

import phi3
from conftest import greedy_reference as _reference, random_ids as _ids
from phi3.engine import Engine
from phi3.sampling import SamplingParams

BS = 16  # the cache's block size




def _run(engine: Engine, work) -> list:
    """Submit (prompt, params) pairs at once, step until done; the requests."""
    reqs = [engine.submit(p, q) for p, q in work]
    while engine.busy:
        engine.step()
    return reqs


@pytest.fixture(scope="module")
def models(checkpoints):
    return {kind: (phi3.load(checkpoints[kind][0], device="cpu", dtype="float32"), checkpoints[kind][1])
            for kind in ("longrope", "window", "gqa")}


@pytest.mark.parametrize("kind", ["window", "gqa", "longrope"])
def test_prefix_hits_give_transformers_tokens(models, kind):
    """Prompts sharing a prefix (whole blocks and a partial tail) reuse its keys, and each gets
    transformers' greedy tokens; the first token's log-probabilities equal a cold engine's."""
    llm, ref = models[kind]
    shared = _ids(37, seed=1)  # two whole blocks and 5 tokens
    prompts = [shared + _ids(k, seed=10 + k) for k in (3, 11, 20)] + [shared[:20], shared[:33]]
    if kind == "longrope":  # stay below its 32-token pre-training context so that every key is short
        prompts = [p[:28] for p in prompts]
    params = SamplingParams(max_new_tokens=12, logprobs=5)
    warm = Engine(llm.model, slots=4, max_len=128)
    _run(warm, [(prompts[0], params)])
    hits = _run(warm, [(p, params) for p in prompts[1:]])
    cold = _run(Engine(llm.model, slots=4, max_len=128, prefix_cache=False), [(p, params) for p in prompts[1:]])
    assert [r.cached_tokens for r in hits] == [(min(len(p), len(prompts[0])) - 1) // BS * BS for p in prompts[1:]]
    assert all(r.cached_tokens == 0 for r in cold)
    assert sum(r.cached_tokens for r in hits) > 0
    for hit, miss in zip(hits, cold):
        assert hit.tokens == miss.tokens == _reference(ref, hit.prompt, 12)
        (lp_hit, top_hit), (lp_miss, top_miss) = hit.logprobs[0], miss.logprobs[0]
        assert abs(lp_hit - lp_miss) < 1e-5
        assert [i for i, _ in top_hit] == [i for i, _ in top_miss]
        assert max(abs(a - b) for (_, a), (_, b) in zip(top_hit, top_miss)) < 1e-5


def test_whole_sequence_cached_still_computes_the_last_token(models):
    """The same prompt twice: all but its last block come from the cache; the answer is the same."""
    llm, ref = models["window"]
    prompt = _ids(48, seed=3)  # exactly three blocks: the third is computed again for its logits
    engine = Engine(llm.model, slots=2, max_len=128)
    first, = _run(engine, [(prompt, SamplingParams(max_new_tokens=10))])
    again, = _run(engine, [(prompt, SamplingParams(max_new_tokens=10))])
    assert (first.cached_tokens, again.cached_tokens) == (0, 32)
    assert again.tokens == first.tokens == _reference(ref, prompt, 10)


def test_the_next_turn_reuses_the_generated_tokens(models):
    """A follow-up whose prompt is the last prompt + its answer + more reuses the answer's keys too."""
    llm, ref = models["gqa"]
    engine = Engine(llm.model, slots=2, max_len=128)
    turn1, = _run(engine, [(_ids(21, seed=4), SamplingParams(max_new_tokens=30))])
    follow = turn1.prompt + turn1.tokens + _ids(9, seed=5)
    turn2, = _run(engine, [(follow, SamplingParams(max_new_tokens=10))])
    assert turn2.cached_tokens == (len(turn1.prompt) + len(turn1.tokens) - 1) // BS * BS > len(turn1.prompt)
    assert turn2.tokens == _reference(ref, follow, 10)


def test_an_answer_ending_on_a_stop_id_at_a_block_end_caches_its_last_block(models):
    """A stop id drawn right after the token that fills a block: the step that drew it wrote that
    token's key, so the block is whole and a follow-up reuses it (not one block fewer)."""
    llm, ref = models["gqa"]
    prompt = _ids(20, seed=40)
    answer = _reference(ref, prompt, 13)
    stop = answer[12]  # drawn after 12 new tokens: prompt + answer end at 32, a block end
    assert stop not in answer[:12]
    engine = Engine(llm.model, slots=2, max_len=128)
    turn1 = engine.submit(prompt, SamplingParams(max_new_tokens=30), stop_ids={stop})
    while engine.busy:
        engine.step()
    assert (turn1.finish_reason, turn1.tokens) == ("stop", answer[:12])
    follow = prompt + turn1.tokens + _ids(9, seed=41)
    turn2, = _run(engine, [(follow, SamplingParams(max_new_tokens=10))])
    assert turn2.cached_tokens == 2 * BS
    assert turn2.tokens == _reference(ref, follow, 10)


def test_longrope_sets_never_share_keys(models):
    """A prompt past the pre-training context (long factors) does not reuse short-factor keys of
    the same tokens, and a row crossing mid-decode is prefilled again with the long set; both give
    transformers' tokens, alone or batched with rows that reuse the prefix."""
    llm, ref = models["longrope"]
    base = _ids(30, seed=6)
    engine = Engine(llm.model, slots=4, max_len=128, prefill_chunk=16)
    short, = _run(engine, [(base[:28], SamplingParams(max_new_tokens=2))])
    work = [(base + _ids(12, seed=7), 20), (base[:26], 20), (base[:29], 2), (base + _ids(12, seed=7) + [5], 6)]
    reqs = _run(engine, [(p, SamplingParams(max_new_tokens=n)) for p, n in work])
    assert reqs[0].cached_tokens == 0  # 42 tokens: long keys; the cached ones are short
    assert reqs[1].cached_tokens == reqs[2].cached_tokens == BS  # short prompts: the short block
    assert reqs[3].cached_tokens == 2 * BS  # admitted with the first one: found its blocks as its prefill began
    again, = _run(engine, [(base + _ids(12, seed=7) + [9], SamplingParams(max_new_tokens=5))])
    assert again.cached_tokens == 2 * BS  # now the long blocks are there
    for req, (prompt, n) in zip([*reqs, again], [*work, (again.prompt, 5)]):
        assert req.tokens == _reference(ref, prompt, n), len(prompt)
    assert short.tokens == _reference(ref, base[:28], 2)


def test_preemption_resumes_with_the_same_tokens(models):
    """A pool too small for every row at once: the newest rows are preempted and resumed; each
    request gets the tokens it gets alone, greedy and seeded, in order, with nothing lost."""
    llm, ref = models["gqa"]
    work = [(_ids(20 + 3 * k, seed=30 + k),
             SamplingParams(max_new_tokens=40, **({"temperature": 0.9, "seed": k} if k % 2 else {})))
            for k in range(5)]
    alone = [_run(Engine(llm.model, slots=1, max_len=128), [w])[0].tokens for w in work]
    tight = Engine(llm.model, slots=5, max_len=128, kv_cache_tokens=10 * BS)  # 5 rows would need ~20 blocks
    streamed: dict[int, list[int]] = {}
    reqs = [tight.submit(p, q) for p, q in work]
    while tight.busy:
        for event in tight.step():
            if event.token is not None:
                streamed.setdefault(event.request.id, []).append(event.token)
    assert tight.preempted > 0 and max(r.preemptions for r in reqs) > 0
    assert [r.tokens for r in reqs] == alone
    assert [streamed[r.id] for r in reqs] == alone  # every token streamed once, in order
    assert alone[0] == _reference(ref, work[0][0], 40)
    assert tight.blocks.used == 0  # every block given back (the cached ones are evictable)


def test_eviction_keeps_answers_right(models):
    """Many distinct prompts through a small pool: old cached blocks are evicted least recently used
    first; a prefix used again recently survives, and every answer is transformers'."""
    llm, ref = models["window"]
    engine = Engine(llm.model, slots=2, max_len=128, kv_cache_tokens=12 * BS)
    keep = _ids(40, seed=50)
    _run(engine, [(keep, SamplingParams(max_new_tokens=4))])
    for k in range(6):
        _run(engine, [(_ids(40, seed=60 + k), SamplingParams(max_new_tokens=4))])
        _run(engine, [(keep, SamplingParams(max_new_tokens=4))])  # used again: most recent
    stats = engine.stats()
    assert stats["blocks_cached"] <= 12 and stats["blocks_used"] == 0
    last, = _run(engine, [(keep + [7, 8], SamplingParams(max_new_tokens=8))])
    assert last.cached_tokens == 2 * BS
    assert last.tokens == _reference(ref, keep + [7, 8], 8)
    gone, = _run(engine, [(_ids(40, seed=60) + [1], SamplingParams(max_new_tokens=8))])
    assert gone.cached_tokens == 0  # evicted long ago
    assert gone.tokens == _reference(ref, gone.prompt, 8)


def test_c_step_equals_torch_step_through_pages(models, ran_in_c, monkeypatch):
    """The C decode step reads keys through the block table as the torch step does: same tokens and
    log-probabilities, with prefix hits and several rows."""
    llm, _ = models["gqa"]
    shared = _ids(35, seed=70)
    work = [(shared + _ids(k, seed=71 + k), SamplingParams(max_new_tokens=24, logprobs=3)) for k in (2, 9, 17)]

    def run():
        engine = Engine(llm.model, slots=4, max_len=128)
        _run(engine, work[:1])
        return _run(engine, work[1:])

    in_c = run()
    assert ran_in_c and all(ran_in_c)
    import phi3.kernels
    monkeypatch.setattr(phi3.kernels, "decode_layers", lambda *a, **k: None)  # the torch step, everywhere
    in_torch = run()
    for a, b in zip(in_c, in_torch):
        assert a.cached_tokens == b.cached_tokens == 32
        assert a.tokens == b.tokens
        assert max(abs(x[0] - y[0]) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4


def test_changed_weights_drop_the_prefix_cache(checkpoints):
    """Keys cached under the old weights are not reused after a weight is written in place."""
    llm = phi3.load(checkpoints["window"][0], device="cpu", dtype="float32")
    prompt = _ids(40, seed=80)
    engine = llm.engine_for([(40, SamplingParams())])
    llm.generate(prompt, max_new_tokens=4)
    with torch.no_grad():
        llm.model.model.layers[0].mlp.down_proj.weight.mul_(-2.0)
    req, = _run(engine, [(prompt, SamplingParams(max_new_tokens=6))])
    assert req.cached_tokens == 0
    assert req.tokens == llm.logits(prompt + req.tokens)[len(prompt) - 1:-1].argmax(-1).tolist()


def test_pool_limits_are_clear(models):
    llm, _ = models["window"]
    with pytest.raises(ValueError, match="kv_cache_tokens must be an integer of at least 64"):
        Engine(llm.model, slots=4, max_len=128, kv_cache_tokens=40)
    engine = Engine(llm.model, slots=2, max_len=128, kv_cache_tokens=4 * BS)
    with pytest.raises(ValueError, match="the KV cache holds 64 tokens"):
        engine.submit(_ids(70, seed=1), SamplingParams())
    req = engine.submit(_ids(50, seed=1), SamplingParams(max_new_tokens=100))
    assert req.max_new == 14  # the pool's end is the context's end
    with pytest.raises(ValueError, match="kv_cache_tokens"):
        phi3.load(llm.name, kv_cache_tokens=0)


def test_an_unused_pool_touches_no_memory(models):
    """A large pool costs address space, not resident memory, until its blocks are used."""
    llm, _ = models["window"]

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    before = rss()
    per_token = llm.config.kv_cache_bytes(1, 4)
    engine = Engine(llm.model, slots=8, max_len=128, kv_cache_tokens=(1 << 30) // per_token)  # 1 GiB
    grown = rss() - before
    assert grown < 64 << 20, grown
    _run(engine, [(_ids(40, seed=2), SamplingParams(max_new_tokens=8))])
    assert rss() - before < 64 << 20


@pytest.mark.parametrize("kind", ["longrope", "gqa"])
def test_short_rows_beside_a_long_one_read_only_their_own_keys(models, kind, monkeypatch):
    """One long row decoding with seven short ones: the torch step gives every row transformers'
    tokens while no attention call over several rows reads the long row's length of keys (the
    short rows are not padded to it); the C step gives the same tokens; and a speculative verify
    step (prompt lookup) splits its rows the same way."""
    llm, ref = models[kind]
    import torch.nn.functional as F

    import phi3.kernels
    work = [(_ids(190, seed=90), 24)] + [(_ids(8 + 4 * k, seed=91 + k), 20) for k in range(7)]
    expected = [_reference(ref, p, n) for p, n in work]
    c_step = [r.tokens for r in _run(Engine(llm.model, slots=8, max_len=256),
                                     [(p, SamplingParams(max_new_tokens=n)) for p, n in work])]
    assert c_step == expected
    monkeypatch.setattr(phi3.kernels, "decode_layers", lambda *a, **k: None)  # the torch step
    calls, sdpa = [], F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        if q.shape[2] == 1:  # a decode or verify step's (rows, keys)
            calls.append((k.shape[0], k.shape[2]))
        return sdpa(q, k, v, *args, **kwargs)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    for speculate in (None, "ngram:3:1"):
        calls.clear()
        params = [SamplingParams(max_new_tokens=n, speculate=speculate) for _, n in work]
        reqs = _run(Engine(llm.model, slots=8, max_len=256), list(zip([p for p, _ in work], params)))
        assert [r.tokens for r in reqs] == expected
        long_reads = [rows for rows, keys in calls if keys > 64]  # the long row's positions: 1 (4 verified)
        assert long_reads and max(long_reads) <= (4 if speculate else 1), calls
        assert max(rows * keys for rows, keys in calls) <= 4 * 256, calls


def test_kv_parts_of_a_forward_read_each_part_over_its_own_keys(models, monkeypatch):
    """`Phi3.forward(kv_parts=...)` in the torch step: rows split into parts, each over its own number
    of keys, give the logits of every row over all the keys (the masked ones add nothing) and of the
    C step; a split that is not a partition of the rows, or a part over more keys than kv_len, is refused."""
    import phi3.kernels
    from phi3.cache import KVCache
    llm, _ = models["gqa"]
    lengths = [70, 5, 12, 3]
    cache = KVCache(llm.config, 4, 128, torch.float32)
    with torch.inference_mode():
        for row, n in enumerate(lengths):  # each row's prompt but its last token
            llm.model(torch.tensor([_ids(n - 1, seed=row)]), torch.arange(n - 1)[None], cache, slot=row, kv_len=n - 1)
        last = torch.tensor([[_ids(1, seed=10 + row)[0]] for row in range(4)])
        positions = torch.tensor([[n - 1] for n in lengths])
        in_c = llm.model(last, positions, cache, kv_len=128)
        monkeypatch.setattr(phi3.kernels, "decode_layers", lambda *a, **k: None)  # the torch step
        whole = llm.model(last, positions, cache, kv_len=128)
        assert (in_c - whole).abs().max() < 1e-4
        parts = [(torch.tensor([1, 3]), 8), (torch.tensor([2]), 16), (torch.tensor([0]), 72)]
        split = llm.model(last, positions, cache, kv_parts=parts)
        assert (split - whole).abs().max() < 1e-5
        for bad, kv_len in (([(torch.tensor([1, 3]), 8), (torch.tensor([0]), 72)], None),
                            ([(torch.tensor([0, 1, 1, 3]), 72), (torch.tensor([2]), 16)], None),
                            (parts, 64)):
            with pytest.raises(ValueError, match="kv_parts must partition"):
                llm.model(last, positions, cache, kv_parts=bad, kv_len=kv_len)


def test_a_compiled_step_with_two_parts_gives_transformers_tokens(models):
    """The decode step under torch.compile (fullgraph) with the rows in two parts: one long row, seven
    short ones; every row gets transformers' greedy tokens."""
    llm, ref = models["gqa"]
    work = [(_ids(190, seed=90), 6)] + [(_ids(8 + 4 * k, seed=91 + k), 5) for k in range(7)]
    reqs = _run(Engine(llm.model, slots=8, max_len=256, compile=True),
                [(p, SamplingParams(max_new_tokens=n)) for p, n in work])
    assert [r.tokens for r in reqs] == [_reference(ref, p, n) for p, n in work]


def test_an_engine_rebuilt_for_new_settings_frees_the_old_pool_first(models):
    """Changing an LLM's engine settings (here the prefix cache) drops the old engine, its KV pool
    included, before the new one is sized from the free memory: nothing keeps the old one alive."""
    import weakref
    llm, _ = models["window"]
    llm.generate(_ids(20, seed=3), max_new_tokens=3)
    old = weakref.ref(llm.engine_for([(20, SamplingParams())]))
    before = llm.prefix_cache
    try:
        llm.prefix_cache = not before
        new = llm.engine_for([(20, SamplingParams())])
        assert old() is None and new.blocks.prefix_cache == (not before)
    finally:
        llm.prefix_cache = before


@pytest.mark.parametrize("kind", ["longrope", "gqa"])
def test_an_int8_kv_cache_holds_more_and_stays_close(models, kind, ran_in_c):
    """kv_cache_dtype="int8" (opt-in, approximate): a pool of the same bytes holds 4D / (D + 4D/group)
    times the positions of an fp32 one (a scale per group of 32 elements, or per head); greedy answers equal transformers' here and each token's
    log-probability is within 0.05 of the exact cache's (rows crossing the LongRoPE switch and the
    sliding window included); prefix hits give a cold run's tokens; the C step writes and reads the
    int8 keys as the torch step does (same tokens); a bad value is refused."""
    from phi3.cache import KVCache, kv_group
    llm, ref = models[kind]
    config, D = llm.config, llm.config.head_dim
    assert KVCache.nbytes(config, 1000, torch.float32) / KVCache.nbytes(config, 1000, torch.float32, torch.int8) \
        == pytest.approx(4 * D / (D + 4 * D // kv_group(D)))
    assert (kv_group(96), kv_group(64), kv_group(16)) == (32, 32, 16)
    shared = _ids(21, seed=40)
    work = [(shared + _ids(k, seed=41 + k), 14) for k in (4, 9, 15)]  # 25-36 tokens: crosses 32 (longrope)
    params = SamplingParams(max_new_tokens=14, logprobs=0)
    exact = _run(Engine(llm.model, slots=4, max_len=128), [(p, params) for p, _ in work])
    ran_in_c.clear()
    warm = Engine(llm.model, slots=4, max_len=128, kv_cache_dtype="int8")
    _run(warm, [(shared + [5], params)])
    hits = _run(warm, [(p, params) for p, _ in work])
    assert warm.cache.quantized and ran_in_c and all(ran_in_c)  # the C step reads int8 keys too
    cold = _run(Engine(llm.model, slots=4, max_len=128, kv_cache_dtype="int8", prefix_cache=False),
                [(p, params) for p, _ in work])
    import phi3.kernels
    real, phi3.kernels.decode_layers = phi3.kernels.decode_layers, lambda *a, **k: None  # the torch step
    try:
        in_torch = _run(Engine(llm.model, slots=4, max_len=128, kv_cache_dtype="int8"), [(p, params) for p, _ in work])
    finally:
        phi3.kernels.decode_layers = real
    assert [r.cached_tokens for r in hits] == [BS] * 3
    for hit, miss, torch_step, plain, (prompt, n) in zip(hits, cold, in_torch, exact, work):
        assert hit.tokens == miss.tokens == torch_step.tokens == plain.tokens == _reference(ref, prompt, n)
        # a key computed in another chunk shape may differ in its last bit and then round to the next
        # int8 step (1/127 of its group's largest): far above fp32's 1e-5, far below int8's own cost
        assert max(abs(a[0] - b[0]) for a, b in zip(hit.logprobs, miss.logprobs)) < 2e-3
        assert max(abs(a[0] - b[0]) for a, b in zip(hit.logprobs, torch_step.logprobs)) < 2e-3
        assert max(abs(a[0] - b[0]) for a, b in zip(hit.logprobs, plain.logprobs)) < 0.05
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, int8"):
        Engine(llm.model, slots=1, max_len=64, kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        phi3.load(llm.name, kv_cache_dtype="int4")
    loaded = phi3.load(llm.name, dtype="float32", kv_cache_dtype="int8")
    assert loaded.engine_for([(8, params)]).cache.quantized


@pytest.mark.parametrize("head_dim", [96, 64, 40])
def test_int8_kv_reads_are_the_stored_values_rounded_per_group(head_dim):
    """An int8 cache reads back each position's key and value as Q8_0 rounds them: per group of 32
    elements (the whole head where 32 does not divide it) the nearest multiple of max|x| / 127, so
    within half a step of what was written; a zero group reads as zeros."""
    from phi3.cache import KVCache
    from phi3.config import Phi3Config
    config = Phi3Config.from_dict(dict(model_type="phi3", vocab_size=64, hidden_size=4 * head_dim, intermediate_size=32,
                                       num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=64))
    cache = KVCache(config, 2, 48, torch.float32, kv_dtype=torch.int8)
    g = torch.Generator().manual_seed(5)
    k, v = torch.randn(2, 2, 40, head_dim, generator=g) * 3, torch.randn(2, 2, 40, head_dim, generator=g)
    k[1, 0, 7] = 0  # a position of one head all zeros
    k[0, 1, 3, 5] = 40.0  # an outlier: only its own group's step grows
    cache.write(0, torch.tensor([[0], [1]]), torch.arange(40).expand(2, 40), k, v)
    keys, values = cache.read(0, torch.tensor([0, 1]), 40)
    group = 32 if head_dim % 32 == 0 else head_dim
    for wrote, read in ((k, keys), (v, values)):
        blocks = wrote.unflatten(-1, (head_dim // group, group))
        step = blocks.abs().amax(-1, keepdim=True) / 127
        expected = (torch.round(blocks / torch.where(step > 0, step, 1)) * step).flatten(-2)
        assert torch.allclose(read, expected, rtol=0, atol=1e-6)
        assert ((read - wrote).abs() <= (step / 2).expand_as(blocks).flatten(-2) + 1e-6).all()
    assert (keys[1, 0, 7] == 0).all()
    if group == 32:  # the outlier's group only
        assert (keys[0, 1, 3, 32:] - k[0, 1, 3, 32:]).abs().max() < 0.1
