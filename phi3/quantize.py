"""Weight-only quantization: int8 and int4 linears, swapped in for `nn.Linear` before the weights arrive.

A quantized checkpoint stores, for a linear with N outputs, K inputs and group size g (device-neutral,
safetensors; the scheme is recorded in config.json under `quantization`, see `module_schemes`):

    weight       int8  (N, K)     8 bits, symmetric: w = scales * q,           q in -127..127
                 uint8 (N, K/2)   4 bits, affine:    w = scales * q + biases,  q in 0..15; in each block
                                  of 32 columns byte j holds column j (low nibble) and j + 16 (high
                                  nibble): GGUF's Q4 layout, so its blocks are copied as they are
    scales       fp16  (N, K/g)   g = K (one scale per row) when group_size is null
    biases       fp16  (N, K/g)   4 bits only; a zero point z is biases = -z * scales
    input_scale  (K,)             AWQ only: the layer computes dequantized(w) @ (x * input_scale)

GGUF's Q8_0 is int8 with g = 32, Q4_1 is int4 with g = 32 (biases = its mins), Q4_0 the same with
biases = -8 * scales; `dequantize` in fp32 reproduces `gguf.quants.dequantize` bit for bit.

At load each module picks a kernel for its device and dtype (`choose_kernel`): in fp32 on the CPU
the weights stay packed and phi3's own kernels (`kernels.py`, `csrc/packed.c`) dequantize them in
registers, exact (the same as `x @ dequantize(W).T` up to fp32 summation order) and faster than
dense fp32 weights at decode (docs/PERFORMANCE.md); without a C compiler, and in fp32 elsewhere,
the weight is dequantized once and `F.linear` runs on it, also exact; in bf16/fp16 the weights stay
packed and torch's int8/int4 weight-only matmuls run on them (approximate: bf16 activations).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .model import Linear, linear

__all__ = ["Scheme", "QuantLinear", "QuantEmbedding", "QuantizationError", "quantize_int8", "quantize_int4",
           "dequantize", "module_schemes", "prepare", "choose_kernel", "set_activations"]

BLOCK = 32  # int4 nibble blocks (GGUF's) and the granularity of group sizes
_TINY = 2.0 ** -24  # smallest positive fp16: a scale never goes below it (no division by zero)


class QuantizationError(ValueError):
    """A quantization request or a quantized checkpoint that cannot work; the message says which and why."""


@dataclass(frozen=True)
class Scheme:
    """How one linear is packed: `bits` 8 (symmetric) or 4 (affine), `group_size` columns per scale
    (None: one scale per row), `input_scale` (AWQ's per-input-channel multipliers)."""

    bits: int
    group_size: int | None = None
    input_scale: bool = False

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size is None else in_features // self.group_size

    def check(self, in_features: int, where: str) -> None:
        if self.bits not in (4, 8):
            raise QuantizationError(f"{where}: {self.bits}-bit weights are not supported (use 4 or 8)")
        g = self.group_size
        if g is None and self.bits == 4:
            raise QuantizationError(f"{where}: int4 needs a group size (32, 64, 128, ...)")
        if g is not None and (not isinstance(g, int) or isinstance(g, bool) or g <= 0 or g % BLOCK):
            raise QuantizationError(f"{where}: group size {g!r} is not a positive multiple of {BLOCK}")
        if g is not None and in_features % g:
            raise QuantizationError(f"{where}: group size {g} does not divide the input dimension {in_features}")
        if self.bits == 4 and in_features % BLOCK:
            raise QuantizationError(f"{where}: int4 needs an input dimension divisible by {BLOCK}, got {in_features}")

    def as_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size}


# -- packing and rounding ------------------------------------------------------------------------
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values 0..15 -> (N, K/2) uint8 in GGUF's layout (per 32 columns: low nibbles 0-15, high 16-31)."""
    N, K = q.shape
    q = q.to(torch.uint8).view(N, K // BLOCK, 2, BLOCK // 2)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(N, K // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) uint8 values 0..15; the inverse of `pack_int4`."""
    N = packed.shape[0]
    p = packed.view(N, -1, BLOCK // 2)
    return torch.stack([p & 15, p >> 4], dim=2).reshape(N, -1)


def _fp16_scales(x: torch.Tensor, what: str) -> torch.Tensor:
    out = x.to(torch.float16)
    if not torch.isfinite(out).all():
        raise QuantizationError(f"{what}: weights too large (or not finite) for fp16 scales")
    return out


def quantize_int8(w: torch.Tensor, group_size: int | None = None, scale_dtype=torch.float16, what: str = "weight"):
    """Symmetric round-to-nearest: (N, K) float -> (q int8 (N, K), scales (N, K/g)). The scales are
    rounded to `scale_dtype` first and q computed against the rounded scales."""
    N, K = w.shape
    g = group_size or K
    wg = w.float().contiguous().view(N, K // g, g)
    scales = wg.abs().amax(-1) / 127
    scales = _fp16_scales(scales, what) if scale_dtype == torch.float16 else scales.to(scale_dtype)
    s = scales.float().clamp_min(_TINY)[..., None]
    q = (wg / s).round_().clamp_(-127, 127).to(torch.int8)
    return q.reshape(N, K), scales


def quantize_int4(w: torch.Tensor, group_size: int, what: str = "weight"):
    """Affine (min/max) round-to-nearest per group: (N, K) float -> (packed uint8 (N, K/2), scales, biases),
    scales and biases fp16 (N, K/g); w ~ scales * q + biases."""
    N, K = w.shape
    wg = w.float().contiguous().view(N, K // group_size, group_size)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scales, biases = _fp16_scales((hi - lo) / 15, what), _fp16_scales(lo, what)
    s, b = scales.float().clamp_min(_TINY)[..., None], biases.float()[..., None]
    q = ((wg - b) / s).round_().clamp_(0, 15).to(torch.uint8)
    return pack_int4(q.reshape(N, K)), scales, biases


def dequantize(weight: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (N, K) weight the packed tensors stand for, computed in fp32 (q * s, then + b), cast to `dtype`."""
    q = unpack_int4(weight) if weight.dtype == torch.uint8 else weight
    N, K = q.shape
    G = scales.shape[1]
    w = q.float().view(N, G, K // G).mul_(scales.float()[..., None])  # in place: one (N, K) fp32 buffer
    if biases is not None:
        w += biases.float()[..., None]
    return w.view(N, K).to(dtype)


# -- kernels -------------------------------------------------------------------------------------
def tinygemm_ok(device: torch.device) -> bool:
    """Whether torch's int4 CUDA kernel (`_weight_int4pack_mm`, tinygemm: bf16, sm80+) runs on `device`."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def choose_kernel(scheme: Scheme, out_features: int, in_features: int, device: torch.device, dtype: torch.dtype) -> str:
    """'cpu-fp32' (phi3's own kernels on the packed blocks, fp32 activations: exact), 'dense'
    (dequantized once, F.linear: exact in fp32), 'int8' (`_weight_int8pack_mm`), 'int8-dequant'
    (per-row int8 kept, converted to the activations' dtype on each call for F.linear: gpt-fast's
    way on CUDA, where `_weight_int8pack_mm` has no fast kernel) or 'int4'
    (`_weight_int4pack_mm[_for_cpu]`), by what each device's kernels accept and what measured fastest.
    torch's int kernels are many times slower than F.linear with fp32 activations (docs/QUANTIZATION.md),
    so fp32 never uses them.
    On CUDA int4 needs bf16 and sm80+ (tinygemm); elsewhere the weights are re-rounded to per-row int8,
    still packed."""
    if dtype == torch.float32:
        if device.type == "cpu" and (scheme.bits == 4 or in_features // scheme.groups(in_features) % 16 == 0):
            ok, _ = kernels.available()
            if ok:
                return "cpu-fp32"
            kernels.warn_unavailable()
        return "dense"
    g = scheme.group_size
    int4_ok = scheme.bits == 4 and g in (32, 64, 128, 256) and (
        out_features % 16 == 0 if device.type == "cpu" else out_features % 8 == 0 and in_features % 128 == 0)
    if device.type == "cuda":
        return "int4" if dtype == torch.bfloat16 and int4_ok and tinygemm_ok(device) else "int8-dequant"
    if device.type == "cpu":
        # Decoding streams every weight once per token: on an AVX2 CPU the int4 kernel, slower than the
        # int8 one on a cache-hot layer, decodes SmolLM2 as fast or faster end to end, in less memory
        # (docs/QUANTIZATION.md).
        # Group-wise int8 (GGUF's Q8_0) and odd-shaped int4 are re-rounded to per-row int8 at load.
        return "int4" if int4_ok else "int8"
    return "dense"


class QuantLinear(nn.Module):
    """`nn.Linear` (no bias) with packed weights; takes (..., K) inputs of any leading shape.

    Built on the meta device with the checkpoint's tensors (module docstring); when they are loaded
    (`load_state_dict(..., assign=True)`) or set with `set_packed`, they are converted once to the
    layout of the kernel `choose_kernel` picks for their device and `dtype` (or `kernel`, if given:
    "dense", "int8", "int8-dequant", "int4", or "packed": keep the checkpoint layout and dequantize on every call,
    exact in fp32 with a quarter of the memory but slow; for training, where gradients flow through it)
    or "cpu-fp32" (phi3's kernels, the same layout; gradients take the "packed" path).
    """

    def __init__(self, in_features: int, out_features: int, scheme: Scheme, dtype: torch.dtype = torch.float32,
                 kernel: str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.scheme, self.dtype = in_features, out_features, scheme, dtype
        self.requested_kernel = kernel
        N, K, G = out_features, in_features, scheme.groups(in_features)
        shape, int_dtype = ((N, K // 2), torch.uint8) if scheme.bits == 4 else ((N, K), torch.int8)
        self.register_buffer("weight", torch.empty(shape, dtype=int_dtype))
        self.register_buffer("scales", torch.empty(N, G, dtype=torch.float16))
        self.register_buffer("biases", torch.empty(N, G, dtype=torch.float16) if scheme.bits == 4 else None)
        self.register_buffer("input_scale", torch.empty(K) if scheme.input_scale else None)
        self.kernel = "packed"  # until the tensors arrive: dequantize on every call
        self.activations = "fp32"  # or "int16" (kernel "cpu-fp32" only): see `set_activations`

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.scheme.bits}, "
                f"group_size={self.scheme.group_size}, kernel={self.kernel}"
                + (f", activations={self.activations}" if self.activations != "fp32" else ""))

    def set_packed(self, weight, scales, biases=None, input_scale=None) -> "QuantLinear":
        """Take checkpoint-layout tensors (e.g. fresh from `quantize_int4`) and convert them for the kernel."""
        self.weight, self.scales, self.biases = weight, scales, biases
        self.input_scale = None if input_scale is None else input_scale.to(self.dtype)
        self._convert()
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if not self.weight.is_meta:
            self._convert()

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The effective (N, K) weight (input_scale folded in), as the kernel sees it: exact for
        'dense' and 'int8'; for 'int4' read back through the kernel (in its output precision)."""
        if self.kernel == "dense":
            return self.w.to(dtype)
        if self.kernel in ("int8", "int8-dequant"):
            w = self.q8.float() * self.s8.float()[:, None]
        elif self.kernel == "int4":
            eye = torch.eye(self.in_features, dtype=self.dtype, device=self.sz.device)
            w = self._int4(eye).float().T.contiguous()  # row i of eye @ W^T is column i of W
        else:
            w = dequantize(self.weight, self.scales, self.biases)
        return (w * self.input_scale.float() if self.input_scale is not None else w).to(dtype)

    def _convert(self) -> None:
        N, K, device = self.out_features, self.in_features, self.weight.device
        self.kernel = self.requested_kernel or choose_kernel(self.scheme, N, K, device, self.dtype)
        if self.kernel in ("packed", "cpu-fp32"):
            if self.kernel == "cpu-fp32":  # phi3's own kernels read the checkpoint layout as it is
                self.weight, self.scales = self.weight.contiguous(), self.scales.to(torch.float16).contiguous()
                if self.biases is not None:
                    self.biases = self.biases.to(torch.float16).contiguous()
            return
        if self.kernel == "dense":
            w = dequantize(self.weight, self.scales, self.biases)
            if self.input_scale is not None:  # folded in once
                w, self.input_scale = w * self.input_scale.float(), None
            self.register_buffer("w", w.to(self.dtype), persistent=False)  # (N, K)
        elif self.kernel in ("int8", "int8-dequant"):  # per-row int8, scales in the activations' dtype
            if self.scheme.bits == 8 and self.scheme.group_size is None:
                q, s = self.weight, self.scales.to(self.dtype)
            else:
                q, s = quantize_int8(dequantize(self.weight, self.scales, self.biases), None, self.dtype)
            self.register_buffer("q8", q.contiguous(), persistent=False)  # (N, K) int8
            self.register_buffer("s8", s.reshape(N).contiguous(), persistent=False)  # (N,)
        else:  # int4, tinygemm's layout: w = (q - 8) * scale + zero, scales_and_zeros (K/g, N, 2)
            s, b = self.scales.float(), self.biases.float()
            sz = torch.stack([s, b + 8 * s], dim=-1).transpose(0, 1).contiguous().to(self.dtype)
            q = unpack_int4(self.weight)
            if device.type == "cpu":
                w4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), 1)
            else:  # CUDA (untested here: no GPU): bytes hold (even << 4 | odd) columns, 8 inner k-tiles
                w4 = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).contiguous(), 8)
            self.register_buffer("w4", w4, persistent=False)
            self.register_buffer("sz", sz, persistent=False)
        if not (self.kernel == "int4" and isinstance(self, QuantEmbedding)):  # int4 embeddings read rows from them
            self.weight = self.scales = self.biases = None

    def c_linear(self) -> kernels.CLinear | None:
        """What phi3's C decode step (`kernels.decode_layers`) runs of this layer: the packed tensors
        (kernel "cpu-fp32") or the dequantized fp32 weight (kernel "dense", a GGUF type without a
        packed kernel); None for other kernels and for subclasses with another forward."""
        if type(self).forward is not QuantLinear.forward:
            return None
        if self.kernel == "dense":
            return kernels.CLinear(self.w)
        if self.kernel == "cpu-fp32":
            return kernels.CLinear(self.weight, self.scales, self.biases, self.input_scale, self.activations)
        return None

    def _int4(self, x: torch.Tensor) -> torch.Tensor:
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu if x.device.type == "cpu" else torch.ops.aten._weight_int4pack_mm
        return mm(x, self.w4, self.scheme.group_size, self.sz)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)  # (B*T, K)
        if self.input_scale is not None:
            x = x * self.input_scale
        if self.kernel == "dense":
            y = linear(x, self.w)
        elif self.kernel == "int8":
            y = torch.ops.aten._weight_int8pack_mm(x, self.q8, self.s8)
        elif self.kernel == "int8-dequant":  # int8 in memory, widened per call (gpt-fast's CUDA int8)
            y = F.linear(x, self.q8.to(x.dtype)) * self.s8
        elif self.kernel == "int4":
            y = self._int4(x)
        elif self.kernel == "cpu-fp32" and not (torch.is_grad_enabled() and x.requires_grad):
            y = kernels.packed_linear(x, self.weight, self.scales, self.biases, self.activations == "int16")
        else:
            y = linear(x, self.dequantized(x.dtype))  # F.linear where gradients are needed
        return y.view(*lead, self.out_features)  # (..., N)


class QuantEmbedding(QuantLinear):
    """A packed embedding table: `forward(tokens)` gathers and dequantizes rows; with tied embeddings
    `lm_head` is a `TiedHead` that runs the same packed matrix as a linear (`linear`)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, scheme: Scheme, dtype: torch.dtype = torch.float32,
                 kernel: str | None = None):
        super().__init__(embedding_dim, num_embeddings, scheme, dtype, kernel)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, C)
        if self.kernel == "dense":
            return F.embedding(tokens, self.w)
        if self.kernel in ("int8", "int8-dequant"):
            x = self.q8[tokens].to(self.dtype) * self.s8[tokens, None]  # (B, T, C)
        else:
            rows = [t[tokens.flatten()] if t is not None else None for t in (self.weight, self.scales, self.biases)]
            x = dequantize(*rows, dtype=self.dtype).view(*tokens.shape, self.in_features)
        return x * self.input_scale if self.input_scale is not None else x

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return QuantLinear.forward(self, x)


class TiedHead(nn.Module):
    """`lm_head` of a model with tied embeddings whose embedding table is packed: no tensors of its own."""

    def __init__(self, embedding: QuantEmbedding):
        super().__init__()
        self._embedding = [embedding]  # a list: not a submodule, so its tensors are not listed twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._embedding[0].linear(x)


ACTIVATIONS = ("fp32", "int16")


def check_activations(activations: str) -> None:
    """A clear error for a value `set_activations` does not take (load and serve call it before loading)."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {', '.join(ACTIVATIONS)}, got {activations!r}")


def set_activations(model: nn.Module, activations: str) -> int:
    """Set how the packed linears on phi3's CPU kernels take their inputs; returns how many changed.

    "fp32" (the default) is exact: the same as `x @ dequantize(W).T` up to the order of fp32 sums.
    "int16" (opt-in) rounds each row of x to int16 per block of 32 columns (scale max|x| / 32767)
    and takes integer dots, as llama.cpp does with int8: a faster decode (docs/PERFORMANCE.md), with
    an error of at most 2^-16 of a block's largest input (bf16 activations: 2^-9 of each). It applies to calls
    with fewer than `kernels.DENSE_ROWS` rows (decode steps, short prompts); longer prompts stay
    exact. Linears it cannot take (weights not packed, other devices or dtypes, inputs not in whole
    32-column blocks) stay fp32; if none can, it is an error rather than a silent no-op.
    """
    check_activations(activations)
    eligible = [m for m in model.modules() if isinstance(m, QuantLinear) and m.kernel == "cpu-fp32"
                and kernels.int16_ok(m.scheme.bits, m.in_features, m.scheme.groups(m.in_features))]
    if activations == "int16" and not eligible:
        raise ValueError("activations='int16' needs packed int4/int8 weights (a GGUF's Q4_0/Q4_1/Q8_0 blocks, a "
                         "quantized checkpoint or quantize=...) on the CPU in fp32 with phi3's kernels; this model "
                         "has none")
    changed = sum(m.activations != activations for m in eligible)
    for m in eligible:
        m.activations = activations
    kernels.forget(model)  # the next decode step re-reads the layers
    return changed


# -- which modules, and swapping them in -----------------------------------------------------------
LINEAR_SUFFIXES = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def module_schemes(quantization: dict, num_layers: int, tied: bool, source: str = "config") -> dict[str, Scheme | None]:
    """Module path -> Scheme (None: kept in floating point) from a config's `quantization` entry:

        {"method": "rtn" | "awq" | "gguf", "bits": 4, "group_size": 64,
         "modules": {"lm_head": null, "model.embed_tokens": {"bits": 8, "group_size": 32}, ...}}

    `bits`/`group_size` apply to every linear of the blocks and to `lm_head`; `modules` overrides
    single modules (null keeps one unquantized). The embedding is packed only when listed. With tied
    embeddings `lm_head` is the embedding matrix and follows `model.embed_tokens`. AWQ modules carry
    `input_scale`.
    """
    where = f"{source}: quantization"

    def scheme(d, name) -> Scheme | None:
        if d is None:
            return None
        if not isinstance(d, dict) or not isinstance(d.get("bits"), int):
            raise QuantizationError(f"{where} of {name}: expected {{\"bits\": 4 or 8, \"group_size\": ...}}, got {d!r}")
        return Scheme(d["bits"], d.get("group_size"), awq)

    method = quantization.get("method")
    if method not in ("rtn", "awq", "gguf"):
        raise QuantizationError(f"{where}: method {method!r} is not supported (rtn, awq, gguf)")
    awq = method == "awq"
    overrides = quantization.get("modules") or {}
    if not isinstance(overrides, dict):
        raise QuantizationError(f"{where}: 'modules' must be an object, got {overrides!r}")
    default = scheme(quantization, "the default")
    out = {f"model.layers.{i}.{s}": default for i in range(num_layers) for s in LINEAR_SUFFIXES}
    out["lm_head"] = default
    out["model.embed_tokens"] = None
    for name, d in overrides.items():
        if name not in out:
            raise QuantizationError(f"{where}: 'modules' names {name!r}, which is not a linear or the embedding")
        out[name] = scheme(d, name)
    if tied:
        if "lm_head" in overrides:
            raise QuantizationError(f"{where}: lm_head is tied to the embedding; list model.embed_tokens instead")
        out["lm_head"] = out["model.embed_tokens"]
    return out


def dequantize_per_call(model: nn.Module) -> None:
    """A `phi3.load(prepare=...)` hook for training on a packed base (QLoRA): its packed modules keep
    the checkpoint layout and dequantize on every call, so gradients flow to their inputs (torch's
    int kernels have no backward) while the base stays a quarter (int4) of its float size."""
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.requested_kernel = "packed"


def dequantize_model(model: nn.Module) -> None:
    """Put float modules back in place of packed ones, holding the dequantized weights in each
    module's dtype (exact: what the packed module computes with in fp32), so every weight is a
    trainable parameter and `state_dict` has the plain Hugging Face keys: for full fine-tuning,
    merging an adapter and writing a plain checkpoint."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, QuantLinear):
            continue
        with torch.no_grad():
            w = module.dequantized(module.dtype)
        if isinstance(module, QuantEmbedding):
            new = nn.Embedding(module.out_features, module.in_features, _weight=w, _freeze=True)
        else:
            new = Linear(module.in_features, module.out_features, device="meta")
            new.weight = nn.Parameter(w, requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    if isinstance(getattr(model, "lm_head", None), TiedHead):
        model.lm_head = Linear(model.config.hidden_size, model.config.vocab_size, device="meta")
        model.lm_head.weight = model.model.embed_tokens.weight
    model.config.quantization = None


def prepare(quantization: dict, dtype: torch.dtype, source: str = "config"):
    """The `phi3.load(prepare=...)` hook for a quantized checkpoint: swap the listed modules of the
    meta-built model for packed ones, checking each scheme against the module's shape."""

    def swap(model: nn.Module) -> None:
        cfg = model.config
        schemes = module_schemes(quantization, cfg.num_hidden_layers, cfg.tie_word_embeddings, source)
        for name, scheme in schemes.items():
            if scheme is None or (name == "lm_head" and cfg.tie_word_embeddings):
                continue
            parent, _, child = name.rpartition(".")
            old = model.get_submodule(name)
            if isinstance(old, nn.Embedding):
                scheme.check(old.embedding_dim, f"{source}: {name}")
                new = QuantEmbedding(old.num_embeddings, old.embedding_dim, scheme, dtype)
            else:
                scheme.check(old.in_features, f"{source}: {name}")
                new = QuantLinear(old.in_features, old.out_features, scheme, dtype)
            setattr(model.get_submodule(parent) if parent else model, child, new)
        if cfg.tie_word_embeddings and isinstance(model.model.embed_tokens, QuantEmbedding):
            model.lm_head = TiedHead(model.model.embed_tokens)

    return swap
