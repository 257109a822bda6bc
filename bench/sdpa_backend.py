"""Which SDPA backend phi3's attention (`phi3.model._sdpa`) runs on this GPU, at Phi-3-mini's
(32 heads, 32 KV heads, head dim 96) and Phi-3-medium's (40 heads on 10 KV heads, head dim 128)
shapes: a decode step (one query per row, a bool mask over 4,096 keys), a windowed prefill chunk
and a plain causal prefill, in bf16 and fp32. Prints one line per case with the aten op the
profiler saw (flash, memory-efficient, cuDNN, or math: the slow one).

    python bench/sdpa_backend.py        # bench/gpu.sh runs it
"""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from phi3.model import _sdpa

BACKENDS = {"flash": "_flash_attention", "efficient": "_efficient_attention", "cudnn": "_cudnn_attention",
            "math": "_attention_math"}


def backend(q, k, v, mask) -> str:
    """The SDPA backends whose aten ops ran for one call, by name."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _sdpa(q, k, v, mask)
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages()}
    return ", ".join(b for b, op in BACKENDS.items() if any(op in n for n in names)) or "? " + " ".join(sorted(names))


def main() -> None:
    device = torch.device("cuda")
    for model, H, Hkv, D in (("mini", 32, 32, 96), ("medium", 40, 10, 128)):
        for dtype in (torch.bfloat16, torch.float32):
            for case, B, T, S in (("decode", 16, 1, 4096), ("prefill chunk", 1, 512, 4096), ("prefill", 1, 4096, 4096)):
                q = torch.randn(B, H, T, D, device=device, dtype=dtype)
                k, v = (torch.randn(B, Hkv, S, D, device=device, dtype=dtype) for _ in range(2))
                if case == "prefill":
                    mask = None  # causal over the tokens themselves
                else:  # each row's visible keys (decode rows at their positions; a chunk after a prefix)
                    positions = torch.arange(S - T, S, device=device).expand(B, T)
                    mask = (torch.arange(S, device=device) <= positions[:, :, None])[:, None]
                print(f"{model:<7} {str(dtype).removeprefix('torch.'):<9} {case:<14} {backend(q, k, v, mask)}", flush=True)


if __name__ == "__main__":
    main()
