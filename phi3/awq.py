"""AWQ (activation-aware weight quantization): per-input-channel scales searched on calibration text.

Lin et al., 2023: the few input channels that carry large activations matter most, so scale their
weight columns up before rounding (and the activations down by the same factor, `input_scale`).
For each linear, with x the mean |activation| of each input channel and w the mean relative |weight|,
try s = x^a / w^(1-a) for a in [0, 1) and keep the one whose quantized layer reproduces the
float layer's outputs on the calibration activations best (AutoAWQ's search, duo scaling).

Activations are gathered in one forward pass over the calibration text with hooks on the linears'
inputs, so any model whose linears are modules works; a subsample of tokens is kept per layer.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

GRID = 20  # exponents tried: 0, 1/20, ..., 19/20
# The search's loss is measured on KEEP_TOKENS activation rows and SEARCH_ROWS evenly spaced weight rows
# per layer (s is per input channel, shared by all rows): on SmolLM2 this keeps AWQ's gain over
# round-to-nearest (docs/QUANTIZATION.md) at a quarter of the cost of 256 x 2048, seconds on a CPU.
KEEP_TOKENS = 128
SEARCH_ROWS = 512
SEQUENCE = 512  # tokens per calibration forward pass


class CalibrationError(ValueError):
    """A calibration file that cannot be used: missing, empty, or not text."""


def calibration_text(path: str | Path | None = None) -> str:
    """The user's calibration text (a UTF-8 file), or the built-in default set (phi3/calibration.txt)."""
    if path is None:
        return (resources.files("phi3") / "calibration.txt").read_text(encoding="utf-8")
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CalibrationError(f"calibration file {path}: cannot read it ({e.strerror or e})") from None
    if b"\0" in data:
        raise CalibrationError(f"calibration file {path}: not text (it contains NUL bytes)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationError(f"calibration file {path}: not UTF-8 text (invalid byte at offset {e.start})") from None
    if not text.strip():
        raise CalibrationError(f"calibration file {path}: empty")
    return text


@torch.no_grad()
def collect_inputs(model: nn.Module, targets: dict[str, nn.Module], token_ids: list[int]) -> dict[str, tuple]:
    """Run the model over `token_ids` (in SEQUENCE-token pieces) and record each target module's
    inputs: path -> (mean |x| per input channel (K,), a subsample of rows (<= KEEP_TOKENS, K)), fp32."""
    sums, rows, counts, handles = {}, {}, {}, []

    def hook(name):
        def record(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (tokens, K)
            sums[name] = sums.get(name, 0) + x.abs().sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
            rows.setdefault(name, []).append(x[:: max(1, len(token_ids) // KEEP_TOKENS)])
        return record

    for name, module in targets.items():
        handles.append(module.register_forward_pre_hook(hook(name)))
    device = next(model.parameters()).device
    try:
        pieces = range(0, len(token_ids), SEQUENCE)
        for start in tqdm(pieces, desc="AWQ calibration", unit="chunk", disable=None, leave=False):
            model(torch.tensor([token_ids[start : start + SEQUENCE]], device=device))
    finally:
        for h in handles:
            h.remove()
    return {n: (sums[n] / counts[n], torch.cat(rows[n])[:KEEP_TOKENS]) for n in targets}


@torch.no_grad()
def search_scale(weight: torch.Tensor, x_mean: torch.Tensor, x: torch.Tensor, group_size: int | None,
                 fake_quantize: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The per-input-channel scale s (K,) minimising |x W^T - x (Q(W diag(s)) diag(1/s))^T|^2.

    weight (N, K) fp32; x_mean (K,) mean |x|; x (n, K) sample rows; `fake_quantize` rounds a weight
    to the grid and back (N, K) -> (N, K). s = 1 (plain RTN) is among the candidates, so the
    result is never worse than RTN on these rows. The loss is measured on at most SEARCH_ROWS
    evenly spaced outputs (a 49152-row lm_head costs what a 512-row one does)."""
    N, K = weight.shape
    g = group_size or K
    w_rel = weight.abs().view(N, K // g, g)
    w_mean = (w_rel / w_rel.amax(-1, keepdim=True).clamp_min(1e-12)).view(N, K).mean(0)  # (K,)
    weight = weight[:: -(-N // SEARCH_ROWS)]  # (<= SEARCH_ROWS, K)
    reference = x @ weight.T  # (n, rows)
    best, best_loss = torch.ones(K), float("inf")
    for i in range(GRID):
        a = i / GRID
        s = (x_mean.pow(a) / w_mean.pow(1 - a).clamp_min(1e-4)).clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        candidates = [s, torch.ones(K)] if i == 0 else [s]
        for s in candidates:
            w_q = fake_quantize(weight * s) / s
            loss = (x @ w_q.T - reference).pow(2).mean().item()
            if loss < best_loss:
                best, best_loss = s, loss
    return best
