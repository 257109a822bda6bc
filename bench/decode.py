"""Decode speed, ours against the peers on the same weights, in one run; prints ratios.

    python bench/decode.py                       # SmolLM2-135M-Instruct (Q4_1 GGUF) on this machine
    python bench/decode.py --dtypes default --peers transformers   # the default against transformers fp32
    python bench/decode.py --model DIR_OR_GGUF --device cuda --peers transformers

Our rows: each of --dtypes (a GGUF's Q4_0/Q4_1/Q8_0 blocks stay packed: fp32 computes on their
exact dequantized values, bf16 runs the packed int kernels), then each of --quantize (round to
nearest on the fly, `phi3.load(..., quantize=...)`) with --quantize-dtype (bf16: the int kernels).

Peers: transformers (`generate`, greedy, same dequantized weights), llama.cpp through
llama-cpp-python when it is installed (on the GGUF file itself), and the memory-bandwidth floor:
measured copy bandwidth (read + write, as gpt-fast and our H100 anchors count it) / bytes of
weights read per token: the speed a decoder that only streams its weights once would reach.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

import phi3
from phi3.bench import copy_bandwidth, sync
from phi3.weights import resolve

PROMPT = "The history of the Roman Empire"


def bench_ours(model, device, dtype, new_tokens, quantize=None) -> tuple[float, int, torch.dtype]:
    """tok/s, bytes of weights read per token, and the dtype it ran in (`dtype=None`: the default)."""
    llm = phi3.load(model, device=device, dtype=dtype, quantize=quantize)
    llm.stop_ids = frozenset()  # measure exactly new_tokens steps
    ids = llm.encode_prompt(PROMPT)
    llm.generate(ids, max_new_tokens=8)  # warm-up
    sync(llm.device)
    t = time.perf_counter()
    llm.generate(ids, max_new_tokens=new_tokens)
    sync(llm.device)
    tps = new_tokens / (time.perf_counter() - t)
    weights = [*llm.model.parameters(), *(b for n, b in llm.model.named_buffers() if not n.startswith("rope."))]
    return tps, sum(t.numel() * t.element_size() for t in weights), llm.dtype


def bench_transformers(model, device, dtype, new_tokens) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(model)
    kw = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    folder = path.parent if path.suffix == ".gguf" else path
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kw).to(device).eval()
    ids = AutoTokenizer.from_pretrained(folder, **kw)(PROMPT, return_tensors="pt").input_ids.to(device)
    gen = dict(do_sample=False, eos_token_id=None, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        ref.generate(ids, max_new_tokens=8, min_new_tokens=8, **gen)
        sync(device)
        t = time.perf_counter()
        ref.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **gen)
        sync(device)
    return new_tokens / (time.perf_counter() - t)


def bench_llama_cpp(model, new_tokens, threads) -> float | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    path = resolve(model)
    if path.suffix != ".gguf":
        return None
    # n_batch=1: llama-cpp-python 0.3.36 built here crashes on batched prompt evaluation.
    llm = Llama(str(path), n_threads=threads, n_batch=1, verbose=False)
    llm(PROMPT, max_tokens=8, temperature=0.0)
    t = time.perf_counter()
    out = llm(PROMPT, max_tokens=new_tokens, temperature=0.0, ignore_eos=True) if _accepts_ignore_eos(llm) else \
        llm(PROMPT, max_tokens=new_tokens, temperature=0.0)
    n = out["usage"]["completion_tokens"]
    return n / (time.perf_counter() - t)


def _accepts_ignore_eos(llm) -> bool:
    import inspect

    return "ignore_eos" in inspect.signature(llm.create_completion).parameters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtypes", default="default,bfloat16", help="'default' (phi3.load's choice), float32, bfloat16 …")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--quantize", default="int8,int4", help="on-the-fly quantizations to add ('' for none)")
    ap.add_argument("--quantize-dtype", default="bfloat16")
    ap.add_argument("--peers", default="transformers,llama.cpp")
    args = ap.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = torch.get_num_threads()
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"# {args.model}, greedy, {args.new_tokens} new tokens after {PROMPT!r}")
    print(f"# device {device} ({card}), torch {torch.__version__}, {threads} threads, {time.strftime('%Y-%m-%d')}")
    bw = copy_bandwidth(device) / 1e9
    rows = []
    ours = [(name, None) for name in args.dtypes.split(",")]
    ours += [(args.quantize_dtype, q) for q in args.quantize.split(",") if q]
    for name, quantize in ours:
        tps, weight_bytes, dtype = bench_ours(args.model, device, None if name == "default" else getattr(torch, name),
                                              args.new_tokens, quantize)
        label = "phi3 " + str(dtype).removeprefix("torch.") + (" (the default)" if name == "default" else "") + \
            (f", {quantize} (RTN)" if quantize else "")
        rows.append((f"{label} ({weight_bytes / 1e6:.0f} MB of weights)", tps))
        rows.append((f"bandwidth ceiling, {label} at {bw:.0f} GB/s", bw * 1e9 / weight_bytes))
    peers = args.peers.split(",")
    if "transformers" in peers:
        rows.append(("transformers float32", bench_transformers(args.model, device, torch.float32, args.new_tokens)))
    if "llama.cpp" in peers and device.type == "cpu":
        tps = bench_llama_cpp(args.model, args.new_tokens, threads)
        rows.append(("llama.cpp (llama-cpp-python)", tps))
    first = rows[0][1]
    print(f"{'engine':<64} {'tok/s':>8}   vs {rows[0][0]}")
    for name, tps in rows:
        if tps is None:
            print(f"{name:<64} {'n/a':>8}   (not installed)")
        else:
            print(f"{name:<64} {tps:8.1f} {tps / first:8.2f}x")


if __name__ == "__main__":
    main()
