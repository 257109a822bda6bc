"""Decode speed with a JSON schema against unconstrained decoding, SmolLM2, in the same run.

    python bench/grammar_decode.py [--rounds 3] [--new 64]

Batch 1 and batch 8 (the same prompt in every row; seeded sampling at temperature 0.7, so rows
differ). The schema asks for an array of at least `--new` strings, so every constrained row runs its
whole budget like the free ones: both sides generate exactly `--new` tokens per row. Rounds run as
interleaved A/B pairs (free, JSON, free, JSON, ...) because the machine may be shared; the ratio is
the best JSON round over the best free round. Also: the first-token latency a new schema adds (its
compilation, cold caches), and the one-off cost of llguidance's view of the vocabulary.
"""

from __future__ import annotations

import argparse
import time

import torch

import phi3
from phi3 import SamplingParams, assets, grammar

PROMPT = [{"role": "user", "content": "List fruits, one per entry."}]
TYPICAL = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}, "email": {"type": "string", "format": "email"},
    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
    "address": {"type": "object", "properties": {"street": {"type": "string"}, "zip": {"type": "string",
                                                                                      "pattern": "^[0-9]{5}$"}},
                "required": ["street", "zip"]}}, "required": ["name", "age", "tags", "address"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new", type=int, default=64)
    args = parser.parse_args()
    llm = phi3.load(assets.fetch(assets.SMOLLM2_GGUF))
    llm.stop_ids = frozenset()  # exactly --new tokens per row on both sides
    long_list = {"type": "object", "properties": {"fruits": {"type": "array", "items": {"type": "string"},
                                                             "minItems": args.new}}, "required": ["fruits"]}
    t = time.perf_counter()
    grammar._vocabulary(llm.tokenizer, llm.config.vocab_size)
    print(f"llguidance's vocabulary view (once per tokenizer): {(time.perf_counter() - t) * 1e3:.0f} ms")
    t = time.perf_counter()
    grammar.matcher_for(SamplingParams(json_schema=TYPICAL), llm.tokenizer, llm.config.vocab_size, llm.stop_ids)
    print(f"a typical schema's first use (check + compile + matcher): {(time.perf_counter() - t) * 1e3:.1f} ms; again: ",
          end="")
    t = time.perf_counter()
    grammar.matcher_for(SamplingParams(json_schema=TYPICAL), llm.tokenizer, llm.config.vocab_size, llm.stop_ids)
    print(f"{(time.perf_counter() - t) * 1e3:.2f} ms (cached)")
    for batch in (1, 8):
        best = {"free": 0.0, "json": 0.0}
        for r in range(args.rounds + 1):  # round 0 warms up
            for side in ("free", "json"):
                params = [SamplingParams(max_new_tokens=args.new, temperature=0.7, seed=k,
                                         json_schema=long_list if side == "json" else None) for k in range(batch)]
                t = time.perf_counter()
                outs = llm.generate([PROMPT] * batch, params) if batch > 1 else [llm.generate(PROMPT, params[0])]
                rate = sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t)
                assert all(len(o.token_ids) == args.new for o in outs)
                if r:
                    best[side] = max(best[side], rate)
                    print(f"batch {batch} round {r} {side}: {rate:6.1f} tok/s")
        print(f"batch {batch}: free {best['free']:.1f} tok/s, JSON schema {best['json']:.1f} tok/s, "
              f"ratio {best['json'] / best['free']:.2f}")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
