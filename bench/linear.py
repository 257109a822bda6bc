"""One linear layer, batch 1: which kernel for packed weights, with fp32 and bf16 activations.

    python bench/linear.py                        # SmolLM2 and Phi-3-mini shapes, this CPU
    python bench/linear.py --shapes 1536x576 --compile

Rows (microseconds per call, best of several runs; ratios against fp32 `F.linear` on the dense weight):
  dense fp32 / bf16        F.linear on the dequantized weight
  dense fp32 oneDNN        oneDNN's inner product: what phi3.model.linear runs in fp32 on a CPU from 24 rows on
  dense fp32 phi3 kernel   kernels.dense_linear: what phi3.model.linear runs below 24 rows (exact up to rounding)
  int8 kernel              torch.ops.aten._weight_int8pack_mm, per-row int8
  int4 kernel              _weight_int4pack_mm_for_cpu (CPU) / _weight_int4pack_mm (CUDA), group 32
  packed, per call         the weight kept packed, dequantized to the activation dtype every call
  compiled dequant+matmul  the same under torch.compile (--compile; inductor fuses dequantize and reduce)
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from phi3 import kernels
from phi3.quantize import QuantLinear, Scheme, dequantize, quantize_int4, quantize_int8

SHAPES = {"1536x576": "SmolLM2 gate_up", "576x1536": "SmolLM2 down", "49152x576": "SmolLM2 lm_head",
          "16384x3072": "Phi-3-mini gate_up", "3072x8192": "Phi-3-mini down", "32064x3072": "Phi-3-mini lm_head"}


def timed(fn, device, min_time: float = 0.3) -> float:
    """Best mean time of 5 runs of repeated calls, in microseconds."""
    fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t, n = time.perf_counter(), 0
    while time.perf_counter() - t < min_time / 5 or n < 3:
        fn()
        n += 1
    sync()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t) / n)
    return best * 1e6


def rows(N: int, K: int, device: torch.device, compile_: bool, batch: int = 1):
    torch.manual_seed(0)
    w = torch.randn(N, K) / K ** 0.5
    int4, int8 = quantize_int4(w, 32), quantize_int8(w, None)
    dense = dequantize(*int4).to(device)
    x32 = torch.randn(batch, 1, K, device=device)  # (B, T, C)
    for dtype in (torch.float32, torch.bfloat16):
        x = x32.to(dtype)
        yield f"dense {str(dtype)[6:]} F.linear", timed(_bind(F.linear, x, dense.to(dtype)), device)
        if dtype == torch.float32 and device.type == "cpu":
            yield "dense float32 oneDNN", timed(_bind(torch.ops.mkldnn._linear_pointwise, x, dense, None, "none", [], ""), device)
            if kernels.dense_linear(x, dense) is not None:
                yield "dense float32 phi3 kernel (kernels.dense_linear)", timed(_bind(kernels.dense_linear, x, dense), device)
            for kernel, scheme, packed in [("int8", Scheme(8), int8), ("int4", Scheme(4, 32), int4)]:
                m = QuantLinear(K, N, scheme, dtype, "cpu-fp32").set_packed(*packed)
                yield f"phi3 kernel {kernel}{' g32' if kernel == 'int4' else ''}, float32 activations", timed(_bind(m, x), device)
        for kernel, scheme, packed in [("int8", Scheme(8), int8), ("int4", Scheme(4, 32), int4),
                                       ("packed", Scheme(4, 32), int4)]:
            m = QuantLinear(K, N, scheme, dtype, kernel).set_packed(*[t.to(device) for t in packed])
            label = {"int8": "int8 kernel", "int4": "int4 kernel g32", "packed": "int4 packed, dequantized per call"}
            try:
                yield f"{label[kernel]}, {str(dtype)[6:]} activations", timed(_bind(m, x), device)
            except RuntimeError as e:  # a kernel this device or torch build lacks
                yield f"{label[kernel]}, {str(dtype)[6:]} activations ({str(e).splitlines()[0][:60]})", None
            if compile_ and kernel == "packed":
                torch._dynamo.reset()  # a fresh compile per layer (dynamo caps recompilations of one function)
                yield f"int4 compiled dequant+matmul, {str(dtype)[6:]}", timed(_bind(torch.compile(m.forward), x), device)


def _bind(fn, *args):
    return lambda: fn(*args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="1536x576,576x1536,49152x576,16384x3072,3072x8192")
    ap.add_argument("--batch", type=int, default=1, help="rows of activations (default: %(default)s)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd dequantize+matmul (slow to build)")
    args = ap.parse_args()
    device = torch.device(args.device)
    isa = torch.backends.cpu.get_cpu_capability() if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"# batch-{args.batch} linear, {platform.processor() or platform.machine()} ({isa}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}")
    with torch.inference_mode():
        for shape in args.shapes.split(","):
            N, K = map(int, shape.split("x"))
            print(f"\n{N} x {K} ({SHAPES.get(shape, 'out x in')})")
            results = list(rows(N, K, device, args.compile, args.batch))
            base = results[0][1]
            for name, us in results:
                print(f"  {name:<58} {'n/a' if us is None else f'{us:10.0f} us  {base / us:5.2f}x'}")


if __name__ == "__main__":
    main()
