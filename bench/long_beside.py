"""Decode of N short rows beside one long row, in a form that runs on any commit since the paged
cache (public API only), for A/B runs from two worktrees (docs/PERFORMANCE.md, issue 18):

    PYTHONPATH=<worktree> python bench/long_beside.py LONG N NEW

Random weights at Phi-3-mini width (2 of its 32 layers), fp32 on the CPU; one LONG-token prompt and
N of 64 tokens, NEW tokens each; the prompts' keys are cached first, so each round times decode.
With N + 1 >= 24 rows the torch step runs (the C step takes smaller batches)."""

import sys

import torch

from phi3.bench import prompts, random_llm, time_ours

long_len, n, new = (int(a) for a in sys.argv[1:4])
llm, _ = random_llm("phi-3-mini-128k-instruct", 2, torch.device("cpu"), torch.float32)
llm.stop_ids, llm.prefix_cache = frozenset(), True
llm.kv_cache_tokens = long_len + n * 200 + 1024
vocab = llm.config.vocab_size
together = prompts(1, long_len, vocab, seed=11) + prompts(n, 64, vocab, seed=12)
time_ours(llm, together, 1)  # the prompts' keys, cached
for _ in range(3):
    full = time_ours(llm, together, new)
    first = time_ours(llm, together, 1)
    print(f"decode, {n} rows of 64 tokens beside one of {long_len}: {(n + 1) * (new - 1) / (full - first):.1f} tok/s",
          flush=True)
