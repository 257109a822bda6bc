"""Tiny GGUF files written the way llama.cpp's converter writes them, from random HF Phi-3 weights.

`convert_hf_to_gguf.py` (Phi3MiniModel) keeps Phi-3's fused `qkv_proj` and `gate_up_proj` as
`attn_qkv` and `ffn_up`, writes `rope_factors_long/short` tensors plus `rope.scaling.attn_factor`
for LongRoPE, and `attention.sliding_window` (0 for none). Its LlamaModel stores q, k, v, gate and
up apart and permutes q and k rows for ggml's interleaved RoPE; the Llama files here are made from
the Phi-3 weights by splitting the fused tensors and applying that permutation.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quant_shape_to_byte_shape, quantize
from transformers import Phi3Config, Phi3ForCausalLM

F32 = GGMLQuantizationType.F32
# the types gguf.quants can encode; the others (K- and IQ-quants) are written as random blocks
QUANTIZABLE = {GGMLQuantizationType[n] for n in "F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0".split()}


def tiny_phi3(seed: int = 0, longrope: bool = True, tied: bool = False, **overrides) -> tuple[Phi3Config, dict[str, torch.Tensor]]:
    """A small random Phi-3 (transformers' own model, so its state-dict keys are the real ones).

    Every parameter, norms included, is random so that any two tensors mixed up would differ.
    """
    kw = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=4096, original_max_position_embeddings=256,
              sliding_window=255, bos_token_id=1, eos_token_id=7, pad_token_id=9, rms_norm_eps=1e-5,
              tie_word_embeddings=tied)
    kw.update(overrides)
    half = kw["hidden_size"] // kw["num_attention_heads"] // 2
    if longrope:
        rng = np.random.default_rng(seed + 1)
        kw["rope_scaling"] = {"type": "longrope", "short_factor": (1 + rng.random(half)).tolist(),
                              "long_factor": (1 + 30 * rng.random(half)).tolist()}
    config = Phi3Config(**kw)
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if tied:
        del state["lm_head.weight"]
    return config, state


def encode(w: np.ndarray, qtype: GGMLQuantizationType, rng: np.random.Generator) -> np.ndarray:
    """`w` in GGML type `qtype` as gguf.quants writes it; random blocks for types it cannot encode.

    Random blocks use bytes below 0x78 so that every f16/bf16 scale in them is finite.
    """
    if qtype in QUANTIZABLE:
        return quantize(w.astype(np.float32), qtype)
    return rng.integers(0, 0x78, quant_shape_to_byte_shape(w.shape, qtype), dtype=np.uint8)


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute: rotate-half rows -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(config: Phi3Config, state: dict[str, torch.Tensor], arch: str = "phi3") -> dict[str, np.ndarray]:
    """HF Phi-3 weights under llama.cpp's tensor names for `arch` ("phi3" or "llama")."""
    hd = config.hidden_size // config.num_attention_heads
    q, kv, inter = config.num_attention_heads * hd, config.num_key_value_heads * hd, config.intermediate_size
    out = {"token_embd.weight": state["model.embed_tokens.weight"], "output_norm.weight": state["model.norm.weight"]}
    if "lm_head.weight" in state:
        out["output.weight"] = state["lm_head.weight"]
    for i in range(config.num_hidden_layers):
        pre, blk = f"model.layers.{i}.", f"blk.{i}."
        qkv, gate_up = state[pre + "self_attn.qkv_proj.weight"], state[pre + "mlp.gate_up_proj.weight"]
        out[blk + "attn_norm.weight"] = state[pre + "input_layernorm.weight"]
        out[blk + "ffn_norm.weight"] = state[pre + "post_attention_layernorm.weight"]
        out[blk + "attn_output.weight"] = state[pre + "self_attn.o_proj.weight"]
        out[blk + "ffn_down.weight"] = state[pre + "mlp.down_proj.weight"]
        if arch == "phi3":
            out[blk + "attn_qkv.weight"], out[blk + "ffn_up.weight"] = qkv, gate_up
        else:
            out[blk + "attn_q.weight"] = llama_permute(qkv[:q].numpy(), config.num_attention_heads)
            out[blk + "attn_k.weight"] = llama_permute(qkv[q : q + kv].numpy(), config.num_key_value_heads)
            out[blk + "attn_v.weight"] = qkv[q + kv :]
            out[blk + "ffn_gate.weight"], out[blk + "ffn_up.weight"] = gate_up[:inter], gate_up[inter:]
    return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}


def write_gguf(path: Path, config: Phi3Config, state: dict[str, torch.Tensor], arch: str = "phi3",
               qtype: GGMLQuantizationType = F32, seed: int = 0) -> dict[str, tuple[np.ndarray, GGMLQuantizationType]]:
    """Write a GGUF of `config`/`state` with llama.cpp's names and metadata; 2-D weights in `qtype`.

    Returns {gguf name: (stored array, its type)} as written (norms and rope factors stay F32).
    """
    rng = np.random.default_rng(seed)
    hd = config.hidden_size // config.num_attention_heads
    w = GGUFWriter(path, arch)
    w.add_name("tiny-" + arch)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(config.rope_parameters["rope_theta"])
    w.add_file_type(int(qtype))
    written = {}
    if arch == "phi3":
        orig = config.original_max_position_embeddings
        w.add_rope_scaling_orig_ctx_len(orig)
        w.add_sliding_window(config.sliding_window or 0)
        rope = config.rope_parameters
        if rope.get("rope_type") == "longrope":
            scale = config.max_position_embeddings / orig
            w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1 else 1.0)
            written["rope_factors_long.weight"] = (np.array(rope["long_factor"], np.float32), F32)
            written["rope_factors_short.weight"] = (np.array(rope["short_factor"], np.float32), F32)
    # a small vocabulary, so the metadata has string, float and int arrays like a real file
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>" for i in range(config.vocab_size)])
    w.add_token_scores([-float(i) for i in range(config.vocab_size)])
    w.add_token_types([1] * config.vocab_size)
    w.add_bos_token_id(config.bos_token_id)
    w.add_eos_token_id(config.eos_token_id)
    w.add_pad_token_id(config.pad_token_id)
    for name, value in gguf_tensors(config, state, arch).items():
        t = qtype if value.ndim == 2 else F32
        written[name] = (encode(value, t, rng), t)
    for name, (data, t) in written.items():
        w.add_tensor(name, data, raw_dtype=None if t == F32 else t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


def gguf_string(s: str | bytes) -> bytes:
    """A GGUF string: u64 length, then the bytes."""
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def raw_gguf(kvs: list[tuple[str | bytes, int, bytes]] = (), tensors: list[tuple[str, list[int], int, int]] = (),
             data: bytes = b"", *, magic: bytes = b"GGUF", version: int = 3,
             n_kv: int | None = None, n_tensors: int | None = None) -> bytes:
    """Hand-built GGUF bytes, any field forgeable: kvs are (key, value type, encoded value),
    tensors (name, dims in GGUF order, ggml type, data offset); data starts at the next 32-byte boundary."""
    out = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                              len(kvs) if n_kv is None else n_kv)
    for key, vtype, value in kvs:
        out += gguf_string(key) + struct.pack("<I", vtype) + value
    for name, dims, ggml_type, offset in tensors:
        out += gguf_string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, offset)
    return out + bytes(-len(out) % 32) + data
