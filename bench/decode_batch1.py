"""Batch-1 greedy decode of SmolLM2-135M-Instruct (its Q4_1 GGUF, fp32 activations: exact), three
rounds, for A/B runs of the CPU kernels' builds in one session (docs/PERFORMANCE.md):

    PHI3_KERNELS=avx2 python bench/decode_batch1.py   # the AVX2 build on an AVX-512 CPU
    python bench/decode_batch1.py                     # this CPU's build
"""

import time

import phi3
from phi3.sampling import SamplingParams

llm = phi3.load("smollm2-135m-instruct")
llm.stop_ids, llm.prefix_cache = frozenset(), False
ids = list(range(100, 228))  # a 128-token prompt
llm.generate(ids, SamplingParams(max_new_tokens=8))  # warm-up
for _ in range(3):
    t = time.perf_counter()
    llm.generate(ids, SamplingParams(max_new_tokens=1))
    first = time.perf_counter() - t
    t = time.perf_counter()
    llm.generate(ids, SamplingParams(max_new_tokens=128))
    full = time.perf_counter() - t
    print(f"{phi3.kernels.build_info()['simd']}: decode {127 / (full - first):.1f} tok/s", flush=True)
