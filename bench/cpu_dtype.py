"""bf16 or fp32 on this CPU? Decode speed of a random-weight model with a preset's shapes.

    python bench/cpu_dtype.py --preset phi-3-mini-128k-instruct --layers 4

Uses `--layers` of the preset's layers (full width and vocabulary) so it runs without real weights.
"""

from __future__ import annotations

import argparse
import time

import torch

import phi3
from phi3.generate import LLM
from phi3.model import Phi3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="phi-3-mini-128k-instruct")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    cfg = phi3.preset(args.preset)
    cfg.num_hidden_layers = args.layers
    llms = {}
    for dtype in (torch.bfloat16, torch.float32):
        torch.manual_seed(0)
        llms[dtype] = LLM(Phi3(cfg).to(dtype).eval().requires_grad_(False))
    prompt = list(range(100, 132))
    results = {dtype: [] for dtype in llms}
    for _ in range(args.runs):  # alternate, so drift on a shared machine hits both alike
        for dtype, llm in llms.items():
            llm.generate(prompt, max_new_tokens=4)
            t = time.perf_counter()
            llm.generate(prompt, max_new_tokens=args.new_tokens)
            results[dtype].append(args.new_tokens / (time.perf_counter() - t))
    print(f"# {args.preset} shapes, {args.layers} layers, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for dtype, runs in results.items():
        print(f"{str(dtype):<16} " + ", ".join(f"{r:.1f}" for r in runs) + " tok/s")


if __name__ == "__main__":
    main()
