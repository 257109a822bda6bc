"""Write a model as a plain Hugging Face checkpoint that transformers, PEFT and `phi3.load` all read;
`merge` folds a LoRA adapter into its base and writes the result; `quantize_checkpoint` (`phi3
quantize`) loads a model, quantizes it and writes the packed checkpoint (`phi3.convert`'s layout).
Both load their source here, so that `convert` and `loader` do not import each other.

    model.safetensors (the base's own layout: fused for Phi-3, q/k/v and gate/up apart for Llama)
    config.json (the base's, or built from GGUF metadata)
    tokenizer files and generation_config.json (copied from the base, or written for a GGUF base)
"""

from __future__ import annotations

import json
import shutil
from dataclasses import fields
from pathlib import Path

import torch
from safetensors.torch import save_file

from .convert import same_mode
from .generate import LLM
from .weights import FUSED_PROJECTIONS

# Files of a model directory that describe its tokenizer and generation, copied as they are.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "generation_config.json", "added_tokens.json")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def checkpoint_state(llm: LLM, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's tensors under the base layout's Hugging Face keys, in `dtype` (packed weights
    dequantized: a plain checkpoint; `phi3 quantize` writes packed ones)."""
    from .lora import LoRALinear

    if any(isinstance(m, LoRALinear) for m in llm.model.modules()):
        raise ValueError("the model carries a LoRA adapter: merge it first (phi3.lora.merge_lora)")
    from .quantize import QuantLinear

    config = llm.config
    state = dict(llm.model.state_dict())
    for name, module in llm.model.named_modules():  # packed modules are written as plain weights
        if isinstance(module, QuantLinear):
            for key in [k for k in state if k.startswith(name + ".")]:
                del state[key]
            state[name + ".weight"] = module.dequantized(torch.float32)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    if config.model_type == "llama":  # split the projections we fused on load
        sizes = {"self_attn.qkv_proj.weight": (config.q_size, config.kv_size, config.kv_size),
                 "mlp.gate_up_proj.weight": (config.intermediate_size, config.intermediate_size)}
        for key in list(state):
            for fused, parts in FUSED_PROJECTIONS.items():
                if key.endswith(fused):
                    prefix = key[: -len(fused)]
                    for part, piece in zip(parts, state.pop(key).split(sizes[fused])):
                        state[prefix + part] = piece
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}


def config_dict(llm: LLM, base: Path | None, dtype: torch.dtype) -> dict:
    """The base's config.json with the saved dtype; for a GGUF base, built from the config's fields."""
    if base is not None and base.is_dir() and (base / "config.json").is_file():
        data = json.loads((base / "config.json").read_text(encoding="utf-8"))
        data.pop("quantization", None)
        data.pop("quantization_config", None)
    else:
        data = {f.name: getattr(llm.config, f.name) for f in fields(llm.config) if f.name not in ("source", "quantization")}
        data["architectures"] = ["LlamaForCausalLM" if llm.config.model_type == "llama" else "Phi3ForCausalLM"]
        if data["rope_scaling"] is None:
            data.pop("rope_scaling")
    data["torch_dtype"] = _DTYPE_NAMES[dtype]
    data.pop("dtype", None)
    return data


def save_pretrained(llm: LLM, out: str | Path, base: str | Path | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write `llm` (plain linears: merge adapters first) to the directory `out` as a Hugging Face checkpoint.

    `base`: the directory or .gguf file it was loaded from, whose config and tokenizer files are
    carried over; `dtype`: the weights' dtype (default: the model's).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = Path(base) if base is not None else None
    dtype = dtype or llm.dtype
    save_file(checkpoint_state(llm, dtype), out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config_dict(llm, base, dtype), indent=2) + "\n")
    same_mode(out / "model.safetensors", out / "config.json")
    copied = [f for f in TOKENIZER_FILES if base is not None and base.is_dir() and (base / f).is_file()]
    for name in copied:
        shutil.copyfile(base / name, out / name)
    if not copied and llm.tokenizer is not None:  # a GGUF base: its vocabulary as a Hugging Face tokenizer
        llm.tokenizer.save(out)
    return out


def merge(model, adapter, out, *, dtype=None, device=None) -> Path:
    """Fold the LoRA adapter in `adapter` into `model` and write a plain checkpoint to `out`
    (weights in the base's layout, config, tokenizer files). `dtype`: the saved
    weights' (default: the base checkpoint's, fp32 for a GGUF base). Merging is done in fp32."""
    from .loader import load, pick_device, pick_dtype
    from .lora import apply_adapter, merge_lora, read_adapter
    from .quantize import dequantize_model, dequantize_per_call
    from .weights import resolve

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not empty; pick a new or empty directory")
    base = resolve(model)
    lora = read_adapter(adapter)
    # A packed base (a GGUF's blocks, a quantized checkpoint) is dequantized first: the merged
    # checkpoint is plain, its weights the base's exact values plus the adapter's.
    llm = load(base, device=pick_device(device), dtype=torch.float32, prepare=dequantize_per_call)
    dequantize_model(llm.model)
    apply_adapter(llm.model, lora)
    merge_lora(llm.model)
    if dtype is None:
        saved = llm.config.torch_dtype if base.is_dir() else None
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(saved), torch.float32)
    else:
        dtype = pick_dtype(dtype, torch.device("cpu"), None)
    return save_pretrained(llm, out, base=base, dtype=dtype)


def quantize_checkpoint(model: str | Path, out: str | Path, bits, method: str = "rtn", group_size: int | None = ...,
                        calibration: str | Path | None = None, keep_lm_head: bool = False, device=None) -> Path:
    """`phi3 quantize`: load `model` in fp32 (anything `phi3.load` accepts), quantize it, write `out`.
    Everything that can be checked (bits, method, group size, calibration file, output directory,
    an already-quantized source) is checked before the weights are read."""
    from . import awq
    from .convert import check_request, quantize_weights, save_quantized, stored_float_dtype
    from .loader import load
    from .quantize import QuantizationError
    from .weights import read_config, resolve

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise QuantizationError(f"{out} already exists and is not an empty directory")
    source = resolve(model)
    config, _ = read_config(source)
    check_request(config, bits, group_size, method, keep_lm_head)
    if method == "awq":
        awq.calibration_text(calibration)
    llm = load(source, device=device, dtype="float32")
    quantization, packed = quantize_weights(llm, bits, group_size, method, calibration, keep_lm_head)
    return save_quantized(llm, source, out, quantization, packed, stored_float_dtype(llm, config.torch_dtype))
