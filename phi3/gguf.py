"""GGUF files (llama.cpp's format) → Hugging Face config dict + Phi-3 state dict.

The header is parsed and validated here by a small bounded reader (`gguf.GGUFReader` trusts every
count and offset, so a hostile or truncated file could make it crash, allocate without bound or
loop for hours, and it takes seconds to parse a vocabulary). Tensor data is then read from the
memory-mapped file at the validated offsets. Q4_0, Q4_1 and Q8_0 blocks are kept packed on request
(`phi3.quantize`'s layout, bit-exact with the format's own dequantization) or dequantized in torch;
other types go through `gguf.quants.dequantize`, the format's own code.
"""

from __future__ import annotations

import math
import mmap
import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize
from tqdm.auto import tqdm

from . import quantize

__all__ = ["GGUFError", "read_metadata", "read_config_dict", "load_gguf"]


class GGUFError(ValueError):
    """A GGUF file is malformed or not loadable; the message names the file and what is wrong."""


# Value types of the GGUF spec: id -> numpy dtype (little-endian); 8 is a string, 9 an array.
_NUMERIC = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
_UINT32, _UINT64 = 4, 10
_U64 = struct.Struct("<Q")
_MAX_KEY = 1 << 16  # the spec's limit on key length
_MAX_STRING = 1 << 24  # a chat template is kilobytes; 16 MiB is far beyond any real value
_MAX_NAME = 1 << 10  # llama.cpp caps tensor names at 64 bytes
# GGUFReader keeps one numpy view per array element (~25 µs each); the largest real vocabularies
# need < 1M elements (tokens + scores + types + merges), so this bounds its work on hostile files.
_MAX_ITEMS = 1 << 21

_SUPPORTED = {GGMLQuantizationType[n] for n in (
    "F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K "
    "IQ1_S IQ1_M IQ2_XXS IQ2_XS IQ2_S IQ3_XXS IQ3_S IQ4_NL IQ4_XS").split()}


class _Tensor(NamedTuple):
    shape: tuple[int, ...]  # torch order, (out, in): GGUF lists the contiguous dimension first
    ggml_type: GGMLQuantizationType
    offset: int = 0  # of its data from the start of the file, validated against the file size
    nbytes: int = 0


class _Header:
    """Walks a GGUF header in `buf` without trusting any count, length, type or offset in it."""

    def __init__(self, path: Path, buf: Any):
        self.path, self.buf, self.pos, self.items = path, buf, 0, 0

    def fail(self, what: str) -> None:
        raise GGUFError(f"{self.path}: {what}")

    def take(self, n: int, what: str) -> int:
        left = len(self.buf) - self.pos
        if n > left:
            self.fail(f"truncated: {what} needs {n} bytes at offset {self.pos}, {left} left in the file")
        self.pos += n
        return self.pos - n

    def nums(self, vtype: int, count: int, what: str) -> list:
        dt = np.dtype(_NUMERIC[vtype])
        start = self.take(count * dt.itemsize, what)
        return np.frombuffer(self.buf, dt, count, start).tolist()

    def u32(self, what: str) -> int:
        return self.nums(_UINT32, 1, what)[0]

    def u64(self, what: str) -> int:
        return self.nums(_UINT64, 1, what)[0]

    def string(self, what: str, cap: int = _MAX_STRING) -> str:
        n = self.u64(f"length of {what}")
        if n > cap:
            self.fail(f"{what} claims {n} bytes (limit {cap})")
        start = self.take(n, what)
        try:
            return self.buf[start : start + n].decode("utf-8")
        except UnicodeDecodeError as e:
            self.fail(f"{what} is not UTF-8 ({e.reason} at byte {e.start})")

    def value(self, vtype: int, what: str) -> Any:
        if vtype in _NUMERIC:
            return self.nums(vtype, 1, what)[0]
        if vtype == _STRING:
            return self.string(what)
        if vtype != _ARRAY:
            self.fail(f"{what} has unknown value type {vtype}")
        itype, n = self.u32(f"element type of {what}"), self.u64(f"length of {what}")
        if itype not in _NUMERIC and itype != _STRING:  # arrays of arrays occur in no model file
            self.fail(f"{what} is an array of unsupported element type {itype}")
        # every element takes at least one byte, so a length past the bytes left is a lie
        if n > len(self.buf) - self.pos or self.items + n > _MAX_ITEMS:
            self.fail(f"{what} claims {n} elements, more than the file can hold (or over {_MAX_ITEMS})")
        self.items += n
        if itype in _NUMERIC:
            return self.nums(itype, n, what)
        return self.strings(n, what)

    def strings(self, n: int, what: str) -> list[str]:
        """n strings in a row: a tight loop over well-formed ones (a vocabulary has ~10^5); the first
        that is not is re-read by `string`, which says what is wrong with it."""
        buf, pos, size, out = self.buf, self.pos, len(self.buf), []
        length_at = _U64.unpack_from
        try:
            for _ in range(n):
                (length,) = length_at(buf, pos)
                end = pos + 8 + length
                if length > _MAX_STRING or end > size:
                    break
                out.append(str(buf[pos + 8 : end], "utf-8"))
                pos = end
        except (struct.error, UnicodeDecodeError):
            pass
        self.pos = pos
        out += [self.string(f"{what}[{i}]") for i in range(len(out), n)]
        return out


def _read_header(path: Path) -> tuple[dict[str, Any], dict[str, _Tensor]]:
    """Validate the whole header and tensor table of `path`; return (metadata, tensors by name)."""
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:  # mmap refuses empty files
            return _parse(_Header(path, b""))
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return _parse(_Header(path, m))


def _parse(h: _Header) -> tuple[dict[str, Any], dict[str, _Tensor]]:
    size = len(h.buf)
    magic = bytes(h.buf[h.take(4, "magic") : 4])
    if magic != b"GGUF":
        h.fail(f"not a GGUF file (magic {magic!r}, expected b'GGUF')")
    version = h.u32("version")
    if version not in (2, 3):
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        h.fail("big-endian GGUF files are not supported" if swapped in (2, 3) else f"unsupported GGUF version {version}")
    n_tensors, n_kv = h.u64("tensor count"), h.u64("metadata count")
    # smallest possible entries: a key/value is 8+4+1 bytes, a tensor info 8+4+8+4+8
    if n_kv * 13 + n_tensors * 32 > size - h.pos:
        h.fail(f"header claims {n_kv} metadata entries and {n_tensors} tensors, more than {size} bytes can hold")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = h.string("metadata key", _MAX_KEY)
        vtype = h.u32(f"type of {key!r}")
        if key in metadata:
            h.fail(f"duplicate metadata key {key!r}")
        if key == "general.alignment" and vtype != _UINT32:
            h.fail(f"general.alignment has value type {vtype}, expected uint32")
        metadata[key] = h.value(vtype, repr(key))
    align = metadata.get("general.alignment", 32)
    if align <= 0 or align & (align - 1):
        h.fail(f"general.alignment {align} is not a power of two")
    infos = []
    for _ in range(n_tensors):
        name = h.string("tensor name", _MAX_NAME)
        n_dims = h.u32(f"dimension count of {name!r}")
        if not 1 <= n_dims <= 4:
            h.fail(f"tensor {name!r} has {n_dims} dimensions (expected 1 to 4)")
        dims = h.nums(_UINT64, n_dims, f"dimensions of {name!r}")
        raw_type, offset = h.u32(f"type of {name!r}"), h.u64(f"offset of {name!r}")
        if raw_type not in GGML_QUANT_SIZES:
            h.fail(f"tensor {name!r} has unknown ggml type {raw_type}")
        infos.append((name, dims, GGMLQuantizationType(raw_type), offset))
    data_start = -(-h.pos // align) * align
    tensors: dict[str, _Tensor] = {}
    for name, dims, qtype, offset in infos:
        block, type_size = GGML_QUANT_SIZES[qtype]
        if name in tensors:
            h.fail(f"duplicate tensor {name!r}")
        if min(dims) < 1 or dims[0] % block:
            h.fail(f"tensor {name!r} of type {qtype.name} has invalid shape {dims} (rows of {block}-element blocks)")
        nbytes = int(np.prod(dims, dtype=object)) // block * type_size
        if offset % align or data_start + offset + nbytes > size:
            h.fail(f"tensor {name!r} ({qtype.name}, shape {dims}) at data offset {offset} needs {nbytes} bytes "
                   f"from byte {data_start + offset}, but the file has {size} bytes (alignment {align})")
        tensors[name] = _Tensor(tuple(reversed(dims)), qtype, data_start + offset, nbytes)
    return metadata, tensors


def read_metadata(path) -> dict[str, Any]:
    """All key/value metadata of the GGUF file at `path` as Python values, after validating the header.

    Raises GGUFError for any malformed file (truncated, wrong magic, absurd counts or lengths, ...).
    """
    return _read_header(Path(path))[0]


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
    state, schemes = {}, {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        data = np.frombuffer(m, np.uint8)

        def read(name: str, as_packed: bool) -> dict[str, torch.Tensor] | None:
            t = tensors[name]
            raw = data[t.offset : t.offset + t.nbytes]
            return _packed(raw, t) if as_packed else {"weight": _dequantized(raw, t).to(dtype)}

        try:
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
            _add_rope_factors(cfg, tensors, data)
        finally:
            del data  # the mmap closes only once no array looks into it
    if schemes:
        cfg["quantization"] = _quantization(schemes, cfg)
    return cfg, state, md


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
