"""GGUF files (llama.cpp's format) → Hugging Face config dict + Phi-3 state dict.

The header is validated first by `phi3.gguf_header`'s bounded reader; tensor data is then read from
the memory-mapped file at the offsets it checked. Q4_0, Q4_1 and Q8_0 blocks are kept packed on
request (`phi3.quantize`'s layout, bit-exact with the format's own dequantization) or dequantized in
torch; other types go through `gguf.quants.dequantize`, the format's own code.
"""

from __future__ import annotations

import math
import mmap
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize
from tqdm.auto import tqdm

from . import quantize
from .gguf_header import GGUFError, _read_header, _Tensor, read_metadata

__all__ = ["GGUFError", "read_metadata", "read_config_dict", "load_gguf"]

_SUPPORTED = {GGMLQuantizationType[n] for n in (
    "F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K "
    "IQ1_S IQ1_M IQ2_XXS IQ2_XS IQ2_S IQ3_XXS IQ3_S IQ4_NL IQ4_XS").split()}


# The one name table: Hugging Face key <- GGUF tensors, concatenated along rows in this order from
# those the file has. Llama GGUFs keep q, k, v and gate, up apart; Phi-3 GGUFs store `attn_qkv`
# ([Q | K | V]) and a fused `ffn_up` that holds [gate | up] (llama.cpp's phi3 swiglu takes the
# first half as gate). "{i}" runs over the layers. `lm_head.weight` is absent when tied.
_NAMES = {
    "model.embed_tokens.weight": ("token_embd.weight",),
    "model.layers.{i}.input_layernorm.weight": ("blk.{i}.attn_norm.weight",),
    "model.layers.{i}.self_attn.qkv_proj.weight": (
        "blk.{i}.attn_qkv.weight", "blk.{i}.attn_q.weight", "blk.{i}.attn_k.weight", "blk.{i}.attn_v.weight"),
    "model.layers.{i}.self_attn.o_proj.weight": ("blk.{i}.attn_output.weight",),
    "model.layers.{i}.post_attention_layernorm.weight": ("blk.{i}.ffn_norm.weight",),
    "model.layers.{i}.mlp.gate_up_proj.weight": ("blk.{i}.ffn_gate.weight", "blk.{i}.ffn_up.weight"),
    "model.layers.{i}.mlp.down_proj.weight": ("blk.{i}.ffn_down.weight",),
    "model.norm.weight": ("output_norm.weight",),
    "lm_head.weight": ("output.weight",),
}
_ROPE_FACTORS = ("rope_factors_short.weight", "rope_factors_long.weight")


def _config(path: Path, md: dict[str, Any], tensors: dict[str, _Tensor]) -> dict[str, Any]:
    """Hugging Face config fields from the metadata (every value type- and range-checked)."""

    def get(key: str, kind: type, default: Any = ..., low: int = 1) -> Any:
        value = md.get(key, default)
        if value is ...:
            raise GGUFError(f"{path}: metadata key {key!r} is missing")
        if value is None:
            return None
        if not isinstance(value, kind) or isinstance(value, bool) or not (
            low <= value < 2**40 if kind is int else 0 < value < math.inf  # NaN fails too
        ):
            raise GGUFError(f"{path}: metadata {key!r} = {value!r} is not a valid {kind.__name__}")
        return value

    arch = md.get("general.architecture")
    if arch not in ("phi3", "llama"):
        raise GGUFError(f"{path}: architecture {arch!r} is not supported (phi3 or llama)")
    embed = tensors.get("token_embd.weight")
    if embed is None or len(embed.shape) != 2:
        raise GGUFError(f"{path}: no 2-D tensor 'token_embd.weight'")
    hidden, heads = get(f"{arch}.embedding_length", int), get(f"{arch}.attention.head_count", int)
    if f"{arch}.attention.key_length" not in md and hidden % heads:
        raise GGUFError(f"{path}: hidden size {hidden} does not split into {heads} heads")
    head_dim = get(f"{arch}.attention.key_length", int, hidden // heads)
    if head_dim % 2 or get(f"{arch}.rope.dimension_count", int, head_dim) != head_dim:
        raise GGUFError(f"{path}: RoPE over part of (or an odd) head dimension {head_dim} is not supported")
    if md.get(f"{arch}.rope.scaling.type", "none") != "none" or "rope_freqs.weight" in tensors:
        raise GGUFError(f"{path}: rope scaling {md.get(f'{arch}.rope.scaling.type')!r} is not supported")
    window = f"{arch}.attention.sliding_window"
    cfg = {
        "model_type": arch,
        "vocab_size": embed.shape[0],
        "hidden_size": hidden,
        "intermediate_size": get(f"{arch}.feed_forward_length", int),
        "num_hidden_layers": get(f"{arch}.block_count", int),
        "num_attention_heads": heads,
        "num_key_value_heads": get(f"{arch}.attention.head_count_kv", int, heads),
        "rms_norm_eps": get(f"{arch}.attention.layer_norm_rms_epsilon", float),
        "rope_theta": get(f"{arch}.rope.freq_base", float, 10000.0),
        "max_position_embeddings": get(f"{arch}.context_length", int),
        # llama.cpp's converter writes 0 when the checkpoint has no sliding window
        "sliding_window": get(window, int) if md.get(window) else None,
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": get("tokenizer.ggml.bos_token_id", int, None, low=0),
        "eos_token_id": get("tokenizer.ggml.eos_token_id", int, None, low=0),
        "pad_token_id": get("tokenizer.ggml.padding_token_id", int, None, low=0),
    }
    if heads % cfg["num_key_value_heads"]:
        raise GGUFError(f"{path}: {heads} attention heads do not split into {cfg['num_key_value_heads']} KV heads")
    if head_dim * heads != hidden:
        cfg["head_dim"] = head_dim
    if f"{arch}.rope.scaling.original_context_length" in md:
        cfg["original_max_position_embeddings"] = get(f"{arch}.rope.scaling.original_context_length", int)
    if any(n in tensors for n in _ROPE_FACTORS):
        factors = ((head_dim // 2,), GGMLQuantizationType.F32)
        if any(n not in tensors or tensors[n][:2] != factors for n in _ROPE_FACTORS):
            raise GGUFError(f"{path}: LongRoPE needs F32 tensors {_ROPE_FACTORS} of {head_dim // 2} floats each")
        cfg["rope_scaling"] = {"type": "longrope"}  # the factor lists are read with the tensors
        if f"{arch}.rope.scaling.attn_factor" in md:
            cfg["rope_scaling"]["attention_factor"] = get(f"{arch}.rope.scaling.attn_factor", float)
    return cfg


def _plan(path: Path, cfg: dict[str, Any], tensors: dict[str, _Tensor]) -> dict[str, list[str]]:
    """HF key -> the GGUF tensors that make it, checked against the config's shapes before any read."""
    h, i, v, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    hd = cfg.get("head_dim", h // cfg["num_attention_heads"])
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    want = dict(zip(_NAMES, [(v, h), (h,), (q + 2 * kv, h), (h, q), (h,), (2 * i, h), (h, i), (h,), (v, h)]))
    plan, unused = {}, set(tensors) - set(_ROPE_FACTORS)
    for key, names in _NAMES.items():
        for layer in range(layers) if "{i}" in key else [0]:
            hf, names_i = key.format(i=layer), [n.format(i=layer) for n in names]
            parts = [n for n in names_i if n in tensors]
            if not parts and hf == "lm_head.weight":
                continue
            if not parts:
                raise GGUFError(f"{path}: missing tensor {names_i[-1]!r} (for {hf})")
            shape = (sum(tensors[n].shape[0] for n in parts), *tensors[parts[0]].shape[1:])
            if shape != want[key] or any(tensors[n].shape[1:] != want[key][1:] for n in parts):
                raise GGUFError(f"{path}: {' + '.join(parts)} make {hf} of shape {shape}, expected {want[key]}")
            plan[hf] = parts
            unused -= set(parts)
    if unused:
        raise GGUFError(f"{path}: unexpected tensors {sorted(unused)[:8]} (not a plain {cfg['model_type']} model)")
    return plan


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: (out, in) -> (out, in).

    Its Llama converter reorders each head's rows from rotate-half pairs (j, j + d/2) into
    adjacent pairs (2j, 2j + 1) for ggml's interleaved RoPE; rotate-half RoPE needs them back.
    """
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, -1).transpose(1, 2).reshape(w.shape)


# GGUF types kept packed, with their bit width (blocks of 32 weights: fp16 scale d, Q4_1 an fp16 min m, then q)
_PACKED = {GGMLQuantizationType.Q8_0: 8, GGMLQuantizationType.Q4_0: 4, GGMLQuantizationType.Q4_1: 4}


def has_packed_blocks(path) -> bool:
    """Whether `phi3.load` keeps any matrix of this file packed (Q4_0, Q4_1 or Q8_0), from the header."""
    return any(t.ggml_type in _PACKED and len(t.shape) == 2 for t in _read_header(Path(path))[1].values())


def packed_memory_bytes(path) -> int:
    """Bytes of weights `phi3.load` keeps for this file in fp32 on a CPU with phi3's kernels (read from
    the header alone): Q4_0/Q4_1/Q8_0 matrices as their blocks (int4 with fp16 scales and biases:
    0.625 bytes a weight; int8 with fp16 scales: 1.0625), every other tensor as fp32."""
    total = 0
    for t in _read_header(Path(path))[1].values():
        n, bits = math.prod(t.shape), _PACKED.get(t.ggml_type) if len(t.shape) == 2 else None
        total += 4 * n if bits is None else (n // 2 + n // 32 * 4 if bits == 4 else n + n // 32 * 2)
    return total


def load_gguf(path, dtype: torch.dtype = torch.float32, packed: bool = False) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """Load a Phi-3 or Llama GGUF file as (config_dict, state_dict, metadata).

    `config_dict` uses Hugging Face config.json field names; `state_dict` has the Hugging Face
    Phi-3 keys (fused `qkv_proj` [Q | K | V] and `gate_up_proj` [gate | up]; no `lm_head.weight`
    when the embeddings are tied), dequantized to `dtype`. With `packed`, Q4_0, Q4_1 and Q8_0
    matrices stay packed instead (`weight`, `scales`, `biases` in `phi3.quantize`'s layout) and
    `config_dict["quantization"]` lists them. Raises GGUFError for any bad file.
    """
    path = Path(path)
    md, tensors = _read_header(path)
    cfg = _config(path, md, tensors)
    plan = _plan(path, cfg, tensors)
    for name, t in tensors.items():
        if t.ggml_type not in _SUPPORTED:
            raise GGUFError(f"{path}: tensor {name!r} has type {t.ggml_type.name}, which is not supported")
    # only llama.cpp's Llama converter permutes; its Phi-3 converter keeps rotate-half order
    llama = cfg["model_type"] == "llama"
    permuted = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]} if llama else {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        data = np.frombuffer(m, np.uint8)
        try:
            state, schemes = _read_tensors(data, tensors, plan, permuted, dtype, packed)
            _add_rope_factors(cfg, tensors, data)
        finally:
            del data  # the mmap closes only once no array looks into it
    if schemes:
        cfg["quantization"] = _quantization(schemes, cfg)
    return cfg, state, md


def _read_tensors(data: np.ndarray, tensors: dict[str, _Tensor], plan: dict[str, list[str]], permuted: dict[str, int],
                  dtype: torch.dtype, packed: bool) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """The state dict from the file's bytes `data` (copied out), and the schemes of the modules kept packed."""
    state, schemes = {}, {}

    def read(name: str, as_packed: bool) -> dict[str, torch.Tensor] | None:
        t = tensors[name]
        raw = data[t.offset : t.offset + t.nbytes]
        return _packed(raw, t) if as_packed else {"weight": _dequantized(raw, t).to(dtype)}

    for hf, parts in tqdm(plan.items(), desc="reading GGUF", unit="tensor", disable=None, leave=False):
        types = {tensors[n].ggml_type for n in parts}
        as_packed = packed and len(types) == 1 and types <= set(_PACKED) and len(tensors[parts[0]].shape) == 2
        loaded = [read(n, as_packed) for n in parts]
        if None in loaded:  # blocks whose biases do not fit fp16: dequantize the module instead
            as_packed, loaded = False, [read(n, False) for n in parts]
        for name, part in zip(parts, loaded):
            role = name.split(".")[-2]  # attn_q, ffn_up, ...
            if role in permuted:
                part.update((k, _unpermute(v, permuted[role])) for k, v in part.items())
        prefix = hf.removesuffix("weight")
        for key in loaded[0]:
            state[prefix + key] = loaded[0][key] if len(loaded) == 1 else torch.cat([p[key] for p in loaded])
        if as_packed:
            schemes[prefix.rstrip(".")] = {"bits": _PACKED[types.pop()], "group_size": quantize.BLOCK}
    return state, schemes


def _dequantized(raw: np.ndarray, t: _Tensor) -> torch.Tensor:
    """A tensor's values in fp32, torch-order shape: packable types in torch (bit-exact with
    `gguf.quants.dequantize`), the others through it."""
    parts = _packed(raw, t) if t.ggml_type in _PACKED else None
    if parts is not None:
        return quantize.dequantize(parts["weight"], parts["scales"], parts.get("biases")).view(t.shape)
    if t.ggml_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        kind = "<f4" if t.ggml_type == GGMLQuantizationType.F32 else "<f2"
        return torch.from_numpy(raw.view(kind).astype(np.float32).reshape(t.shape))
    arr = dequantize(raw.reshape(*t.shape[:-1], -1), t.ggml_type)  # float32, torch-order shape
    return torch.from_numpy(arr if arr.flags.writeable else arr.copy())


def _packed(raw: np.ndarray, t: _Tensor) -> dict[str, torch.Tensor] | None:
    """Q8_0 / Q4_0 / Q4_1 blocks of an (N, K) tensor -> weight, scales (and biases) in phi3.quantize's layout.

    Q4_0's biases are -8 * d, exact in fp16 unless d is huge or not finite (then None: dequantize instead)."""
    N, K = t.shape if len(t.shape) == 2 else (1, t.shape[0])
    _, type_size = GGML_QUANT_SIZES[t.ggml_type]
    blocks = raw.reshape(N, K // quantize.BLOCK, type_size)
    d = torch.from_numpy(np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0])  # (N, K/32)
    if t.ggml_type == GGMLQuantizationType.Q8_0:
        q = torch.from_numpy(np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(N, K))
        return {"weight": q, "scales": d}
    qs = torch.from_numpy(np.ascontiguousarray(blocks[..., -quantize.BLOCK // 2:]).reshape(N, K // 2))
    if t.ggml_type == GGMLQuantizationType.Q4_1:
        m = torch.from_numpy(np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0])
        return {"weight": qs, "scales": d, "biases": m}
    biases = -8 * d
    if not torch.isfinite(biases).all():
        return None
    return {"weight": qs, "scales": d, "biases": biases}


def _quantization(schemes: dict[str, dict], cfg: dict) -> dict:
    """The config's `quantization` entry for the modules kept packed (see phi3.quantize.module_schemes)."""
    layers = [f"model.layers.{i}.{s}" for i in range(cfg["num_hidden_layers"]) for s in quantize.LINEAR_SUFFIXES]
    heads = [] if cfg["tie_word_embeddings"] else ["lm_head"]
    common = max(({"bits": b, "group_size": quantize.BLOCK} for b in (4, 8)),
                 key=lambda s: sum(schemes.get(n) == s for n in layers))
    modules = {n: schemes.get(n) for n in layers + heads if schemes.get(n) != common}
    if "model.embed_tokens" in schemes:
        modules["model.embed_tokens"] = schemes["model.embed_tokens"]
    return {"method": "gguf", **common, "modules": modules}


def read_config_dict(path) -> dict[str, Any]:
    """The config_dict of `load_gguf` without reading the weights (only the small RoPE factor tensors)."""
    path = Path(path)
    md, tensors = _read_header(path)
    cfg = _config(path, md, tensors)
    if "rope_scaling" in cfg:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            data = np.frombuffer(m, np.uint8)
            _add_rope_factors(cfg, tensors, data)
            del data
    return cfg


def _add_rope_factors(cfg: dict[str, Any], tensors: dict[str, _Tensor], data: np.ndarray) -> None:
    if "rope_scaling" in cfg:
        for kind, name in zip(("short_factor", "long_factor"), _ROPE_FACTORS):
            t = tensors[name]
            cfg["rope_scaling"][kind] = data[t.offset : t.offset + t.nbytes].view("<f4").tolist()
