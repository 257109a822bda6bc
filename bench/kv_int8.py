"""What the opt-in int8 KV cache costs a real model: SmolLM2-135M-Instruct (its Q4_1 GGUF, fp32),
greedy answers to eight chat prompts with the exact cache and with int8, where they first differ,
how far apart the chosen tokens' log-probabilities are before that, and batch-1 decode speed both
ways (docs/PERFORMANCE.md):

    HF_HUB_OFFLINE=1 python bench/kv_int8.py
"""

import time

import phi3
from phi3.cache import KVCache, kv_dtype_of
from phi3.sampling import SamplingParams

PROMPTS = ["What is the capital of France?", "Write a haiku about autumn.", "Explain photosynthesis in two sentences.",
           "List three uses of a paperclip.", "What is 17 times 23?", "Translate 'good morning' into Spanish.",
           "Give me a tip for learning to cook.", "Why is the sky blue?"]
NEW = 64

llm = phi3.load("smollm2-135m-instruct")
llm.prefix_cache = False
runs = {}
for kv in ("auto", "int8"):
    llm.kv_cache_dtype = kv
    engine = llm.engine_for([(1, SamplingParams())])
    runs[kv] = [engine.submit(llm.encode_prompt([{"role": "user", "content": p}]),
                              SamplingParams(max_new_tokens=NEW, logprobs=0), frozenset(llm.stop_ids)) for p in PROMPTS]
    while engine.busy:
        engine.step()
same, firsts, gaps = 0, [], []
for exact, approx in zip(runs["auto"], runs["int8"]):
    a, b = exact.tokens, approx.tokens
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    same += a == b
    firsts.append(None if a == b else n)
    gaps += [abs(x[0] - y[0]) for x, y in zip(exact.logprobs[:n], approx.logprobs[:n])]
print(f"identical answers: {same}/{len(PROMPTS)}; first differing token of the others: {firsts}")
print(f"chosen tokens' log-probabilities before any difference: max |delta| {max(gaps):.4f}, "
      f"mean {sum(gaps) / len(gaps):.5f} over {len(gaps)} tokens")
ids = llm.encode_prompt([{"role": "user", "content": PROMPTS[0]}])
llm.stop_ids = frozenset()
for kv in ("auto", "int8"):
    llm.kv_cache_dtype = kv
    llm.generate(ids, SamplingParams(max_new_tokens=4))
    t = time.perf_counter()
    llm.generate(ids, SamplingParams(max_new_tokens=1))
    first = time.perf_counter() - t
    t = time.perf_counter()
    llm.generate(ids, SamplingParams(max_new_tokens=NEW))
    print(f"kv_cache_dtype={kv}: decode {(NEW - 1) / (time.perf_counter() - t - first):.1f} tok/s, "
          f"{KVCache.nbytes(llm.config, 1, llm.dtype, kv_dtype_of(kv))} bytes per position")
