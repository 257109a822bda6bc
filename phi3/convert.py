"""Quantize a loaded model's weights (RTN or AWQ) and write a quantized checkpoint directory.

    phi3.load(SRC, dtype="float32") ─► quantize_weights ─► {module: packed tensors}, scheme
        ├─► install: packed modules in place (`phi3.load(SRC, quantize="int4")`)
        └─► save_quantized: safetensors + config.json (`quantization`) + tokenizer + generation files

The layout and the modules are `phi3.quantize`'s; AWQ's search is `phi3.awq`'s.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import awq
from .quantize import (LINEAR_SUFFIXES, QuantEmbedding, QuantizationError, QuantLinear, Scheme, TiedHead,
                       quantize_int4, quantize_int8)

METHODS = ("rtn", "awq")
DEFAULT_GROUP_SIZE = {4: 32, 8: None}  # int4: chosen from the measurements in docs/QUANTIZATION.md


def parse_bits(bits) -> int:
    """4 or 8 from 4, 8, "4", "8", "int4" or "int8"; anything else is a QuantizationError."""
    value = {"4": 4, "8": 8, "int4": 4, "int8": 8}.get(str(bits).lower())
    if value is None:
        raise QuantizationError(f"unsupported quantization {bits!r}: use int8 or int4 (8 or 4 bits)")
    return value


def check_request(config, bits, group_size=..., method: str = "rtn", keep_lm_head: bool = False) -> Scheme:
    """The Scheme a quantization request asks for, checked against the model's config before any
    weight is read: bits, method, group size against every quantized layer's input dimension, and
    a source that is already quantized (a GGUF's blocks count as its weights: they are requantized)."""
    bits = parse_bits(bits)
    if method not in METHODS:
        raise QuantizationError(f"unsupported method {method!r}: use {' or '.join(METHODS)}")
    if config.quantization is not None and config.quantization.get("method") != "gguf":
        raise QuantizationError(f"{config.source}: the model is already quantized "
                                f"({config.quantization.get('method')}, {config.quantization.get('bits')} bits); "
                                "quantize its floating-point original instead")
    scheme = Scheme(bits, DEFAULT_GROUP_SIZE[bits] if group_size is ... else group_size, method == "awq")
    inputs = {"qkv_proj, gate_up_proj" + ("" if keep_lm_head else ", lm_head"): config.hidden_size,
              "o_proj": config.q_size, "down_proj": config.intermediate_size}
    for names, k in inputs.items():
        scheme.check(k, names)
    return scheme


def targets(model: nn.Module, keep_lm_head: bool = False) -> dict[str, nn.Module]:
    """Module path -> module to quantize: every linear of the blocks, and lm_head unless kept. With tied
    embeddings the lm_head matrix is the embedding's, listed as `model.embed_tokens` (calibrated
    on lm_head's inputs)."""
    out = {f"model.layers.{i}.{s}": model.get_submodule(f"model.layers.{i}.{s}")
           for i in range(model.config.num_hidden_layers) for s in LINEAR_SUFFIXES}
    if not keep_lm_head:
        out["model.embed_tokens" if model.config.tie_word_embeddings else "lm_head"] = model.lm_head
    return out


def float_weight(model: nn.Module, name: str) -> torch.Tensor:
    """(N, K) fp32 weight of a module: a float layer's own, a packed one's dequantized (a GGUF's blocks)."""
    module = model.get_submodule(name)
    if isinstance(module, QuantLinear):
        return module.dequantized()
    return module.weight.detach().float()


def quantize_weights(llm, bits: int = 4, group_size: int | None = ..., method: str = "rtn",
                     calibration: str | Path | None = None, keep_lm_head: bool = False):
    """Quantize `llm`'s linears: returns (the config's `quantization` entry, {module path: checkpoint
    tensors}). RTN rounds each group to nearest; AWQ first searches input-channel scales on the
    calibration text (the built-in set, or the UTF-8 file `calibration`)."""
    model, config = llm.model, llm.config
    scheme = check_request(config, bits, group_size, method, keep_lm_head)
    bits, group_size = scheme.bits, scheme.group_size
    mods = targets(model, keep_lm_head)
    stats = {}
    if method == "awq":
        text = awq.calibration_text(calibration)
        if llm.tokenizer is None:
            raise QuantizationError("AWQ needs the model's tokenizer to read the calibration text")
        stats = awq.collect_inputs(model, mods, llm.tokenizer.encode(text))
    packed = {}
    for name in tqdm(mods, desc=f"quantizing ({method}, int{bits})", unit="layer", disable=None, leave=False):
        w = float_weight(model, name)
        input_scale = None
        if name in stats:
            s = awq.search_scale(w, *stats[name], group_size, lambda v: _round_trip(v, bits, group_size))
            w, input_scale = w * s, (1 / s)
        packed[name] = _quantize(w, bits, group_size, name)
        if input_scale is not None:
            packed[name]["input_scale"] = input_scale
    modules = {"lm_head": None} if keep_lm_head and not config.tie_word_embeddings else {}
    if "model.embed_tokens" in packed:
        modules["model.embed_tokens"] = scheme.as_dict()
    return {"method": method, **scheme.as_dict(), "modules": modules}, packed


def _quantize(w: torch.Tensor, bits: int, group_size: int | None, name: str) -> dict[str, torch.Tensor]:
    if bits == 8:
        q, scales = quantize_int8(w, group_size, what=name)
        return {"weight": q, "scales": scales}
    q, scales, biases = quantize_int4(w, group_size, what=name)
    return {"weight": q, "scales": scales, "biases": biases}


def _round_trip(w: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """`dequantize(_quantize(w))` without packing (AWQ's search calls it ~20 times per layer)."""
    N, K = w.shape
    wg = w.view(N, K // (group_size or K), -1)
    if bits == 8:
        s = (wg.abs().amax(-1, keepdim=True) / 127).half().float().clamp_min(2.0 ** -24)
        return ((wg / s).round_().clamp_(-127, 127) * s).view(N, K)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    s, b = ((hi - lo) / 15).half().float().clamp_min(2.0 ** -24), lo.half().float()
    return ((wg - b).div_(s).round_().clamp_(0, 15).mul_(s).add_(b)).view(N, K)


def install(llm, quantization: dict, packed: dict[str, dict[str, torch.Tensor]], kernel: str | None = None) -> None:
    """Swap the quantized modules into `llm.model` (packed kernels for its device and dtype, or `kernel`)."""
    model, dtype = llm.model, llm.dtype
    scheme = Scheme(quantization["bits"], quantization["group_size"], quantization["method"] == "awq")
    for name, tensors in packed.items():
        old = model.get_submodule(name)
        device = llm.device
        tensors = {k: v.to(device) for k, v in tensors.items()}
        if isinstance(old, (nn.Embedding, QuantEmbedding)):
            new = QuantEmbedding(model.config.vocab_size, model.config.hidden_size, scheme, dtype, kernel)
        else:
            new = QuantLinear(model.config.hidden_size if name == "lm_head" else old.in_features,
                              model.config.vocab_size if name == "lm_head" else old.out_features, scheme, dtype, kernel)
        new.set_packed(**tensors)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
        if name == "model.embed_tokens":
            model.lm_head = TiedHead(new)
    model.config.quantization = quantization


def quantize_model(llm, bits: int = 4, group_size: int | None = ..., method: str = "rtn",
                   calibration: str | Path | None = None, keep_lm_head: bool = False, kernel: str | None = None) -> None:
    """Quantize `llm` in place (see `quantize_weights`); its answers are then the quantized model's.
    `kernel` as for `QuantLinear` (default: the fastest for the device and dtype)."""
    install(llm, *quantize_weights(llm, bits, group_size, method, calibration, keep_lm_head), kernel=kernel)


# -- writing a checkpoint ------------------------------------------------------------------------
def stored_float_dtype(llm, checkpoint_dtype: str | None) -> torch.dtype:
    """The dtype a quantized checkpoint stores its floating-point tensors (norms, embedding, kept
    linears) in: the source's when it is 16-bit; for an fp32 source fp16 (11 significant bits) where
    all of them fit its range, else bf16 (8 bits, fp32's range). 16 bits either way: at Phi-3-mini
    width an fp32 embedding alone is 394 MB, more than the packed layers."""
    source = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(str(checkpoint_dtype))
    if source is not None:
        return source
    limit = torch.finfo(torch.float16).max
    fits = all(t.abs().max() <= limit for t in llm.model.state_dict().values() if t.is_floating_point() and t.numel())
    return torch.float16 if fits else torch.bfloat16


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "generation_config.json")


def save_quantized(llm, source: Path, out: str | Path, quantization: dict,
                   packed: dict[str, dict[str, torch.Tensor]], float_dtype: torch.dtype) -> Path:
    """Write the quantized checkpoint: model.safetensors (packed tensors and the float ones, the latter
    in `float_dtype`), config.json with `quantization`, tokenizer and generation files. A GGUF source's
    tokenizer is written as Hugging Face files, so the output loads without the GGUF."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, value in llm.model.state_dict().items():  # norms and the float layers kept
        if key.rpartition(".")[0] not in packed and not (llm.config.tie_word_embeddings and key == "lm_head.weight"):
            state[key] = value.to(float_dtype)
    for name, module in llm.model.named_modules():  # a GGUF's packed layers that stay floating point
        if isinstance(module, QuantLinear) and name not in packed:
            state[f"{name}.weight"] = module.dequantized(float_dtype)
    for name, tensors in packed.items():
        state.update({f"{name}.{k}": v.contiguous() for k, v in tensors.items()})
    save_file({k: v.cpu().contiguous() for k, v in state.items()}, out / "model.safetensors",
              metadata={"format": "pt", "quantization": json.dumps(quantization)})
    config = _source_config(source)
    config.update(quantization=quantization, torch_dtype=str(float_dtype).removeprefix("torch."))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    same_mode(out / "model.safetensors", out / "config.json")
    if source.suffix == ".gguf":
        if llm.tokenizer is not None:
            llm.tokenizer.save(out)
    else:
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, out / name)
    return out


def same_mode(path: Path, like: Path) -> None:
    """Give `path` the permissions of `like` (a file written as usual, under the umask): safetensors
    creates its files readable by their owner only."""
    os.chmod(path, stat.S_IMODE(like.stat().st_mode))


def _source_config(source: Path) -> dict:
    if source.suffix == ".gguf":
        from .gguf import read_config_dict

        return read_config_dict(source)
    return json.loads((source / "config.json").read_text(encoding="utf-8"))
