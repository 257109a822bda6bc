"""GGUF loading: names, fusion, the Llama q/k un-permutation, tensor types, config, bad files.

References that could disagree with us: transformers' own GGUF loader on a real model, weights of
transformers' Phi-3 written out in llama.cpp's layout, `gguf.GGUFReader` for the metadata, and
RoPE computed both ways for the permutation.
"""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize
from gguf_fixture import gguf_string, raw_gguf, tiny_phi3, write_gguf
from transformers import Phi3Config
from transformers.modeling_rope_utils import _compute_longrope_parameters

import phi3
from phi3 import assets, quantize
from phi3.gguf import GGUFError, load_gguf, read_metadata


def reader_metadata(path) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith("GGUF.")}


# ---------------------------------------------------------------- the real SmolLM2 (Q4_1, llama)


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM

    path = assets.fetch(assets.SMOLLM2_GGUF)
    theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return path, theirs.config, theirs.state_dict(), load_gguf(path)


def test_smollm2_config_matches_transformers(smollm2):
    _, ref, _, (cfg, _, _) = smollm2
    assert cfg["model_type"] == ref.model_type == "llama"
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id"):
        assert cfg[key] == getattr(ref, key), key
    assert cfg["rope_theta"] == ref.rope_parameters["rope_theta"] == 1e5
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["tie_word_embeddings"]) == (9, 3, True)
    assert "head_dim" not in cfg and ref.head_dim == cfg["hidden_size"] // cfg["num_attention_heads"]
    assert cfg["sliding_window"] is None and "rope_scaling" not in cfg


def test_smollm2_state_dict_matches_transformers(smollm2):
    _, ref, theirs, (cfg, ours, _) = smollm2
    fused = {}
    for k, v in theirs.items():
        for parts, name in ((("q_proj", "k_proj", "v_proj"), "qkv_proj"), (("gate_proj", "up_proj"), "gate_up_proj")):
            if k.endswith(f".{parts[0]}.weight"):
                fused[k.replace(parts[0], name)] = torch.cat([theirs[k.replace(parts[0], p)] for p in parts])
        if not any(f".{p}." in k for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
            fused[k] = v
    del fused["lm_head.weight"]  # tied: transformers shares the embedding, we leave it out
    assert set(ours) == set(fused)
    for k in fused:
        assert ours[k].dtype == torch.float32 and ours[k].shape == fused[k].shape, k
        assert torch.equal(ours[k], fused[k]), k


def test_smollm2_stays_packed_and_bit_exact(smollm2):
    path, _, theirs, (_, dense, _) = smollm2
    cfg, packed, _ = load_gguf(path, packed=True)
    assert cfg["quantization"] == {"method": "gguf", "bits": 4, "group_size": 32,
                                   "modules": {"model.embed_tokens": {"bits": 8, "group_size": 32}}}  # Q4_1, Q8_0
    for k, w in dense.items():
        prefix = k.removesuffix("weight")
        if w.ndim == 2:
            assert torch.equal(quantize.dequantize(packed[prefix + "weight"], packed[prefix + "scales"],
                                                   packed.get(prefix + "biases")), w), k
    assert torch.equal(dense["model.embed_tokens.weight"], theirs["model.embed_tokens.weight"])
    # in memory, the blocks as in the file (~100 MB, not 538 MB of fp32): fp32 runs phi3's own kernels on
    # them (exact), bf16 torch's int kernels
    sizes = {}
    for dtype in ("float32", "bfloat16"):
        model = phi3.load(path, dtype=dtype).model
        sizes[dtype] = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert sizes["float32"] < 110e6 and sizes["bfloat16"] < 110e6, sizes
    # ... and `phi3 info` (phi3.loader.packed_weight_bytes) reads the fp32 figure from the header alone
    model = phi3.load(path, dtype="float32").model
    kept = sum(t.numel() * t.element_size() for t in
               [*model.parameters(), *(b for n, b in model.named_buffers() if not n.startswith("rope."))])
    assert phi3.loader.packed_weight_bytes(path) == kept


def test_metadata_matches_gguf_reader(smollm2, tmp_path):
    path, _, _, (_, _, md) = smollm2
    assert md == read_metadata(path) == reader_metadata(path)
    assert len(md["tokenizer.ggml.tokens"]) == 49152 and md["general.architecture"] == "llama"
    config, state = tiny_phi3()
    write_gguf(tmp_path / "t.gguf", config, state)
    assert read_metadata(tmp_path / "t.gguf") == reader_metadata(tmp_path / "t.gguf")


# ---------------------------------------------------------------- tiny Phi-3 and Llama files


def rope_of(config: Phi3Config, seq_len: int):
    return _compute_longrope_parameters(config, "cpu", seq_len=seq_len)


def test_tiny_phi3_f32_roundtrip(tmp_path):
    config, state = tiny_phi3()
    write_gguf(tmp_path / "phi3.gguf", config, state)
    cfg, ours, md = load_gguf(tmp_path / "phi3.gguf")
    assert set(ours) == set(state)
    for k in state:
        assert torch.equal(ours[k], state[k]), k
    assert md["general.architecture"] == "phi3" and md["phi3.attention.sliding_window"] == 255
    assert cfg["model_type"] == "phi3" and cfg["tie_word_embeddings"] is False
    assert cfg["original_max_position_embeddings"] == 256 and cfg["sliding_window"] == 255
    # transformers reads our dict as the same model: same fields, same LongRoPE frequencies and scale
    back = Phi3Config(**cfg)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "original_max_position_embeddings",
                "sliding_window", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(back, key) == getattr(config, key), key
    assert back.rms_norm_eps == pytest.approx(config.rms_norm_eps, rel=1e-6)
    assert back.rope_parameters["rope_theta"] == config.rope_parameters["rope_theta"]
    for seq_len in (10, 257):  # short and long factors
        (f_ref, a_ref), (f_ours, a_ours) = rope_of(config, seq_len), rope_of(back, seq_len)
        torch.testing.assert_close(f_ours, f_ref, rtol=1e-6, atol=0)
        assert a_ours == pytest.approx(a_ref, rel=1e-6) and a_ref == pytest.approx((1 + np.log(16) / np.log(256)) ** 0.5)


def test_tiny_phi3_plain_rope_tied_no_window(tmp_path):
    config, state = tiny_phi3(longrope=False, tied=True, sliding_window=None, max_position_embeddings=256)
    write_gguf(tmp_path / "phi3.gguf", config, state)
    cfg, ours, md = load_gguf(tmp_path / "phi3.gguf")
    assert md["phi3.attention.sliding_window"] == 0  # llama.cpp's "none"
    assert cfg["sliding_window"] is None and cfg["tie_word_embeddings"] is True
    assert "rope_scaling" not in cfg and "lm_head.weight" not in ours
    assert all(torch.equal(ours[k], state[k]) for k in state) and set(ours) == set(state)


def test_tiny_llama_permutation_undone(tmp_path):
    config, state = tiny_phi3(longrope=False, num_attention_heads=4, num_key_value_heads=2)
    written = write_gguf(tmp_path / "llama.gguf", config, state, arch="llama")
    cfg, ours, _ = load_gguf(tmp_path / "llama.gguf")
    assert cfg["model_type"] == "llama" and cfg["sliding_window"] is None and "rope_scaling" not in cfg
    assert set(ours) == set(state) and all(torch.equal(ours[k], state[k]) for k in state)
    # The permutation is what makes ggml's interleaved RoPE on the file's q/k equal rotate-half RoPE
    # on the checkpoint's: check attention scores both ways instead of trusting the formula.
    hd, pos = 16, torch.arange(7.0)
    ang = pos[:, None] * 10000.0 ** (-torch.arange(0, hd, 2) / hd)  # (T, hd/2)
    cos, sin = ang.cos(), ang.sin()

    def rotate_half(x):  # (T, H, hd); pairs (j, j + hd/2)
        a, b = x[..., : hd // 2], x[..., hd // 2 :]
        return torch.cat([a * cos[:, None] - b * sin[:, None], b * cos[:, None] + a * sin[:, None]], -1)

    def interleaved(x):  # pairs (2j, 2j + 1), ggml's normal RoPE mode
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack([a * cos[:, None] - b * sin[:, None], b * cos[:, None] + a * sin[:, None]], -1).flatten(-2)

    x = torch.randn(7, 64)

    def scores(q_w, k_w, rope):  # (H, T, T) attention logits; 4 query heads share 2 KV heads
        q, k = rope((x @ q_w.T).view(7, 4, hd)), rope((x @ k_w.T).view(7, 2, hd)).repeat_interleave(2, dim=1)
        return torch.einsum("thd,shd->hts", q, k)

    qkv = ours["model.layers.0.self_attn.qkv_proj.weight"]  # rows [Q (64) | K (32) | V (32)]
    q_w, k_w = qkv[:64], qkv[64:96]
    q_file, k_file = (torch.from_numpy(written[f"blk.0.attn_{n}.weight"][0]) for n in "qk")
    torch.testing.assert_close(scores(q_file, k_file, interleaved), scores(q_w, k_w, rotate_half), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(q_file, q_w)  # the file really was permuted


# ---------------------------------------------------------------- tensor types

# max |error| of each encodable type relative to the tensor's largest |value|
TOLERANCE = {T.F16: 1e-3, T.BF16: 8e-3, T.Q8_0: 1e-2, T.Q5_0: 5e-2, T.Q5_1: 5e-2, T.Q4_0: 1e-1, T.Q4_1: 1e-1}
RANDOM_BLOCKS = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S,
                 T.IQ3_XXS, T.IQ3_S, T.IQ4_NL, T.IQ4_XS]


@pytest.fixture(scope="module")
def wide_phi3():  # rows of 256 so that every K- and IQ-quant block fits
    return tiny_phi3(vocab_size=32, hidden_size=256, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("qtype", list(TOLERANCE) + RANDOM_BLOCKS, ids=lambda t: t.name)
def test_tensor_types(qtype, wide_phi3, tmp_path):
    config, state = wide_phi3
    written = write_gguf(tmp_path / "q.gguf", config, state, qtype=qtype)
    _, ours, _ = load_gguf(tmp_path / "q.gguf")
    names = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight",
             "model.layers.1.self_attn.qkv_proj.weight": "blk.1.attn_qkv.weight",
             "model.layers.1.self_attn.o_proj.weight": "blk.1.attn_output.weight",
             "model.layers.1.mlp.gate_up_proj.weight": "blk.1.ffn_up.weight",
             "model.layers.1.mlp.down_proj.weight": "blk.1.ffn_down.weight"}
    for hf, name in names.items():
        data, t = written[name]
        assert t == qtype and ours[hf].shape == state[hf].shape
        assert torch.equal(ours[hf], torch.from_numpy(dequantize(data, qtype))), hf
        if qtype in TOLERANCE:  # and it is the original weight, give or take the quantization error
            err = (ours[hf] - state[hf]).abs().max() / state[hf].abs().max()
            assert err < TOLERANCE[qtype], (hf, err)
    assert torch.equal(ours["model.norm.weight"], state["model.norm.weight"])


PACKED = {T.Q4_0: 4, T.Q4_1: 4, T.Q8_0: 8}


@pytest.mark.parametrize("arch", ["phi3", "llama"])
@pytest.mark.parametrize("qtype", list(PACKED), ids=lambda t: t.name)
def test_packed_blocks_dequantize_bit_exactly(qtype, arch, wide_phi3, tmp_path):
    """Q4_0/Q4_1/Q8_0 stay packed (repacked, fused, Llama rows un-permuted) and the packed modules'
    weights are exactly gguf.quants.dequantize of the same blocks."""
    config, state = wide_phi3
    written = write_gguf(tmp_path / "q.gguf", config, state, qtype=qtype, arch=arch)
    _, dense, _ = load_gguf(tmp_path / "q.gguf")  # checked against gguf's dequantize above (and here, for phi3)
    cfg, packed, _ = load_gguf(tmp_path / "q.gguf", packed=True)
    bits = PACKED[qtype]
    assert cfg["quantization"] == {"method": "gguf", "bits": bits, "group_size": 32,
                                   "modules": {"model.embed_tokens": {"bits": bits, "group_size": 32}}}
    llm = phi3.load(tmp_path / "q.gguf", dtype="float32")
    for k, w in dense.items():
        if w.ndim == 1:
            assert torch.equal(packed[k], w)
            continue
        prefix = k.removesuffix("weight")
        assert packed[prefix + "weight"].dtype == (torch.uint8 if bits == 4 else torch.int8)
        assert packed[prefix + "scales"].dtype == torch.float16
        assert torch.equal(quantize.dequantize(packed[prefix + "weight"], packed[prefix + "scales"],
                                               packed.get(prefix + "biases")), w), k
        module = llm.model.get_submodule(prefix.rstrip("."))
        assert isinstance(module, quantize.QuantLinear) and torch.equal(module.dequantized(), w), k
    if arch == "phi3":
        data, _ = written["blk.1.ffn_down.weight"]
        w = llm.model.get_submodule("model.layers.1.mlp.down_proj").dequantized()
        assert torch.equal(w, torch.from_numpy(dequantize(data, qtype)))


def test_q4_0_scales_beyond_fp16_biases_are_dequantized(tmp_path):
    config, state = tiny_phi3(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              num_key_value_heads=1, vocab_size=16, longrope=False)
    path = tmp_path / "big.gguf"
    write_gguf(path, config, state, qtype=T.Q4_0)
    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.ffn_down.weight")
    blob = bytearray(path.read_bytes())
    blob[tensor.data_offset : tensor.data_offset + 2] = np.float16(20000).tobytes()  # -8 d overflows fp16
    path.write_bytes(bytes(blob))
    data = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.ffn_down.weight")
    cfg, packed, _ = load_gguf(path, packed=True)
    assert cfg["quantization"]["modules"]["model.layers.0.mlp.down_proj"] is None
    ref = torch.from_numpy(dequantize(data.data, T.Q4_0))
    assert torch.equal(packed["model.layers.0.mlp.down_proj.weight"], ref) and ref.abs().max() > 1e4
    assert torch.equal(phi3.load(path, dtype="float32").model.get_submodule("model.layers.0.mlp.down_proj").weight, ref)


def test_dtype_argument(wide_phi3, tmp_path):
    config, state = wide_phi3
    write_gguf(tmp_path / "q.gguf", config, state, qtype=T.Q8_0)
    _, f32, _ = load_gguf(tmp_path / "q.gguf")
    _, bf16, _ = load_gguf(tmp_path / "q.gguf", dtype=torch.bfloat16)
    assert all(bf16[k].dtype == torch.bfloat16 and torch.equal(bf16[k], f32[k].bfloat16()) for k in f32)


# ---------------------------------------------------------------- bad files

U32, F32_V, STR, ARR = 4, 6, 8, 9


def arch_kv(arch="phi3"):
    return [("general.architecture", STR, gguf_string(arch))]


def expect_error(tmp_path, blob: bytes, *needles: str, load: bool = False):
    path = tmp_path / "bad.gguf"
    path.write_bytes(blob)
    with pytest.raises(GGUFError) as e:
        (load_gguf if load else read_metadata)(path)
    for needle in (str(path), *needles):
        assert needle in str(e.value), (needle, str(e.value))


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "good.gguf"
    write_gguf(path, *tiny_phi3(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=1, vocab_size=16), qtype=T.Q8_0)
    return path.read_bytes()


def test_truncated(tmp_path, good_file):
    (tmp_path / "good.gguf").write_bytes(good_file)
    data_start = gguf.GGUFReader(tmp_path / "good.gguf").data_offset
    for cut in (0, 3, 10, 30, data_start // 2, data_start - 40):  # inside the header
        expect_error(tmp_path, good_file[:cut], "truncated")
    for cut in (data_start, (data_start + len(good_file)) // 2, len(good_file) - 1):  # inside the tensor data
        expect_error(tmp_path, good_file[:cut], "needs")


def test_wrong_magic_version_endianness(tmp_path, good_file):
    (tmp_path / "v2.gguf").write_bytes(good_file[:4] + struct.pack("<I", 2) + good_file[8:])
    assert load_gguf(tmp_path / "v2.gguf")[0]["hidden_size"] == 32  # version 2 has the same layout
    expect_error(tmp_path, b"GGML" + good_file[4:], "not a GGUF file")
    expect_error(tmp_path, good_file[:4] + struct.pack("<I", 1) + good_file[8:], "version 1")
    expect_error(tmp_path, good_file[:4] + struct.pack(">I", 3) + good_file[8:], "big-endian")


def test_absurd_counts_and_lengths(tmp_path):
    expect_error(tmp_path, raw_gguf(arch_kv(), n_kv=2**60), "metadata entries")
    expect_error(tmp_path, raw_gguf(arch_kv(), n_tensors=2**40), "tensors")
    expect_error(tmp_path, raw_gguf([("k", STR, struct.pack("<Q", 2**62))]), "claims")
    expect_error(tmp_path, raw_gguf([("k", STR, struct.pack("<Q", 40) + b"short")]), "truncated")
    expect_error(tmp_path, raw_gguf([("k", ARR, struct.pack("<IQ", U32, 2**61))]), "elements")
    expect_error(tmp_path, raw_gguf([("k", ARR, struct.pack("<IQ", STR, 3))]), "truncated")
    expect_error(tmp_path, raw_gguf([("k", 13, b"")]), "unknown value type 13")
    expect_error(tmp_path, raw_gguf([("k", U32, b"\0\0\0\0")] * 2), "duplicate metadata key")
    expect_error(tmp_path, raw_gguf([(b"\xff", U32, b"\0\0\0\0")]), "metadata key")
    expect_error(tmp_path, raw_gguf([("k", STR, gguf_string(b"\xff\xfe"))]), "not UTF-8")
    expect_error(tmp_path, raw_gguf([("general.alignment", U32, struct.pack("<I", 48))]), "power of two")
    expect_error(tmp_path, raw_gguf([("general.alignment", F32_V, struct.pack("<f", 32))]), "uint32")
    nested = struct.pack("<IQ", ARR, 1) + struct.pack("<IQ", U32, 0)
    expect_error(tmp_path, raw_gguf([("k", ARR, nested)]), "unsupported element type 9")
    expect_error(tmp_path, raw_gguf([("k", ARR, struct.pack("<IQ", 77, 0))]), "unsupported element type 77")


def test_bad_tensor_infos(tmp_path):
    (tmp_path / "ok.gguf").write_bytes(raw_gguf(arch_kv(), [("a", [32], 0, 0)], bytes(128)))
    assert read_metadata(tmp_path / "ok.gguf") == {"general.architecture": "phi3"}  # the baseline is fine
    expect_error(tmp_path, raw_gguf(arch_kv(), [("a", [32], 99, 0)], bytes(128)), "unknown ggml type 99", "'a'")
    expect_error(tmp_path, raw_gguf(arch_kv(), [("a", [2**40, 2**40], 0, 0)], bytes(128)), "'a'", "needs")
    expect_error(tmp_path, raw_gguf(arch_kv(), [("a", [64], 0, 0)], bytes(128)), "'a'", "needs 256 bytes")
    expect_error(tmp_path, raw_gguf(arch_kv(), [("a", [32], 0, 2**63)], bytes(128)), "'a'")
    expect_error(tmp_path, raw_gguf(arch_kv(), [("a", [32], 0, 4)], bytes(256)), "alignment")
    expect_error(tmp_path, raw_gguf(arch_kv(), [("a", [0], 0, 0)], bytes(128)), "invalid shape")
    expect_error(tmp_path, raw_gguf(arch_kv(), [("a", [16], int(T.Q8_0), 0)], bytes(128)), "invalid shape")
    expect_error(tmp_path, raw_gguf(arch_kv(), [("a", [1] * 5, 0, 0)], bytes(128)), "5 dimensions")
    expect_error(tmp_path, raw_gguf(arch_kv(), [("a", [32], 0, 0)] * 2, bytes(128)), "duplicate tensor")
    expect_error(tmp_path, raw_gguf(arch_kv(), [("a" * 5000, [32], 0, 0)], bytes(128)), "tensor name")


def test_unloadable_models(tmp_path):
    config, state = tiny_phi3(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              num_key_value_heads=1, vocab_size=16, longrope=False)
    path = tmp_path / "m.gguf"
    write_gguf(path, config, state, qtype=T.Q8_0)
    blob = path.read_bytes()
    # a known ggml type that we cannot dequantize: the error names the tensor and the type
    i = blob.index(b"blk.0.ffn_down.weight") + len(b"blk.0.ffn_down.weight")
    as_i8 = blob[: i + 4 + 16] + struct.pack("<I", int(T.I8)) + blob[i + 24 :]
    expect_error(tmp_path, as_i8, "'blk.0.ffn_down.weight'", "I8", load=True)
    expect_error(tmp_path, blob.replace(b"phi3", b"gpt2"), "architecture 'gpt2'", load=True)
    renamed = blob.replace(b"blk.0.ffn_down.weight", b"blk.0.ffn_dowX.weight")
    expect_error(tmp_path, renamed, "missing tensor 'blk.0.ffn_down.weight'", load=True)
    extra = blob.replace(gguf_string("output.weight"), gguf_string("outpuX.weight"))
    expect_error(tmp_path, extra, "unexpected tensors ['outpuX.weight']", load=True)
    expect_error(tmp_path, raw_gguf(arch_kv("llama")), "token_embd", load=True)
    # metadata that disagrees with the tensors' shapes
    key = b"phi3.feed_forward_length"
    j = blob.index(key) + len(key) + 4
    expect_error(tmp_path, blob[:j] + struct.pack("<I", 48) + blob[j + 4 :], "gate_up_proj", "expected", load=True)
    expect_error(tmp_path, blob[:j] + struct.pack("<I", 0) + blob[j + 4 :], "feed_forward_length", load=True)
