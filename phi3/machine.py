"""What this machine lacks that phi3 would use, said where a user looks: `phi3 info` and the
server's /health (and its log at start-up).

The one such thing today is a C compiler for phi3's CPU kernels (`kernels.py`): without one
everything still runs with the same answers, only slower and in more memory, which a user would
not otherwise notice until they compare numbers.
"""

from __future__ import annotations

import os

import torch

__all__ = ["warnings"]


def warnings(device: torch.device | str = "cpu") -> list[str]:
    """One line per missing piece that costs speed or memory on `device`, with what it costs and the
    fix; empty when nothing is missing. Builds the CPU kernels if they are not built yet (once per
    machine; seconds with a compiler, nothing without one)."""
    if torch.device(device).type != "cpu" or os.environ.get("PHI3_KERNELS", "1") == "0":  # off on purpose
        return []
    from . import kernels

    ok, why = kernels.available()
    if ok:
        return []
    return [f"phi3's CPU kernels are not built ({why}): packed int4/int8 weights are dequantized to fp32 "
            "(the same answers in about 5x the memory) and decode steps run in torch instead of C (several "
            "times slower, docs/PERFORMANCE.md). Fix: install a C compiler (Debian/Ubuntu: apt install "
            "gcc; Fedora: dnf install gcc; macOS: xcode-select --install) or set $CC to one, then restart phi3."]
