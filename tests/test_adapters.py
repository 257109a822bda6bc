"""LoRA adapters in PEFT's format: against peft on transformers' models, both ways, for a Phi-3 base
and a Llama-layout base (whose q/k/v and gate/up we fuse); merging; tokenizer files for GGUF bases."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import phi3
from conftest import randomize, write_checkpoint
from phi3 import assets
from phi3.lora import AdapterError, LoRALinear, add_lora, lora_modules, save_adapter

IDS = torch.tensor([[5, 17, 300, 42, 9, 250, 77, 3, 111, 64, 500, 2, 19, 88, 401, 7]])


@pytest.fixture(scope="module")
def phi3_base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phi3-gqa")
    return folder, write_checkpoint(folder, "gqa", seed=4)


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory):
    """A transformers Llama checkpoint (GQA, separate q/k/v and gate/up, tied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    ref = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, rope_theta=1e5,
                                       max_position_embeddings=128, tie_word_embeddings=True)).eval()
    randomize(ref, seed=2)
    ref.save_pretrained(folder)
    return folder, ref


def _random_lora(folder, targets, rank=4, alpha=8, seed=0) -> phi3.LLM:
    """Our model with fresh LoRAs whose B is random too (a trained adapter, in effect)."""
    llm = phi3.load(folder, dtype="float32")
    torch.manual_seed(seed)
    add_lora(llm.model, targets, rank, alpha)
    for _, _, m in lora_modules(llm.model):
        torch.nn.init.normal_(m.lora_B, std=0.2)
    llm.model.eval()
    return llm


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return (out.logits if hasattr(out, "logits") else out)[0].float()


def _reference(folder):
    """A fresh transformers model from `folder` (PEFT wraps it in place, so never reuse one)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("kind", ["phi3", "llama"])
def test_zero_B_lora_equals_base(kind, phi3_base, llama_base):
    folder, ref = phi3_base if kind == "phi3" else llama_base
    llm = phi3.load(folder, dtype="float32")
    base = _logits(llm.model)
    params = add_lora(llm.model, None, rank=8, alpha=16)
    assert all(p.abs().sum() > 0 for p in params[::2])  # A is random: only B = 0 keeps the model
    assert torch.equal(_logits(llm.model), base)
    assert torch.allclose(base, _logits(ref), atol=1e-4)


@pytest.mark.parametrize("kind,targets,saved", [
    ("phi3", None, ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]),
    ("phi3", "q_proj,v_proj,down_proj", ["down_proj", "qkv_proj"]),
    ("llama", None, ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
    ("llama", "q_proj,v_proj,gate_up_proj", ["gate_proj", "q_proj", "up_proj", "v_proj"]),
])
def test_our_adapter_in_peft(kind, targets, saved, phi3_base, llama_base, tmp_path):
    """Saved under transformers' module names, PEFT reads it onto transformers' model: same logits."""
    from peft import PeftModel

    folder, _ = phi3_base if kind == "phi3" else llama_base
    llm = _random_lora(folder, targets)
    save_adapter(llm.model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == saved
    ours = _logits(llm.model)
    theirs = _logits(PeftModel.from_pretrained(_reference(folder), tmp_path).eval())
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    assert (ours - _logits(phi3.load(folder, dtype="float32").model)).abs().max() > 0.1  # the adapter matters
    again = phi3.load(folder, dtype="float32", adapter=tmp_path)
    assert torch.allclose(_logits(again.model), ours, atol=1e-5)
    if targets and "q_proj" in targets:  # rows outside the targeted parts stay untouched
        qkv = again.model.model.layers[0].self_attn.qkv_proj
        k_rows = slice(llm.config.q_size, llm.config.q_size + llm.config.kv_size)
        assert torch.equal(qkv.merged_weight()[k_rows], qkv.base.weight[k_rows])


@pytest.mark.parametrize("kind", ["phi3", "llama"])
def test_peft_adapter_in_ours(kind, phi3_base, llama_base, tmp_path):
    """An adapter PEFT trained elsewhere (own A per part, rank and alpha patterns, rsLoRA) reads exactly."""
    from peft import LoraConfig, PeftModel, get_peft_model

    folder, _ = phi3_base if kind == "phi3" else llama_base
    targets = ["qkv_proj", "down_proj"] if kind == "phi3" else ["q_proj", "v_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, use_rslora=True,
                        rank_pattern={"down_proj": 2},
                        alpha_pattern={"v_proj" if kind == "llama" else "qkv_proj": 3, "layers.1.mlp.down_proj": 5})
    torch.manual_seed(1)
    peft_model = get_peft_model(_reference(folder), config).eval()
    peft_model.save_pretrained(tmp_path)
    theirs = _logits(peft_model)
    llm = phi3.load(folder, dtype="float32", adapter=tmp_path)
    ours = _logits(llm.model)
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    save_adapter(llm.model, tmp_path / "again")  # and back: ranks and scales that differ become patterns
    config = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert config["rank_pattern"] and config["alpha_pattern"]
    again = _logits(PeftModel.from_pretrained(_reference(folder), tmp_path / "again").eval())
    assert torch.allclose(again, theirs, atol=1e-4), (again - theirs).abs().max()


def test_lora_forward_has_no_graph_breaks(phi3_base):
    """No host syncs or data-dependent branches: dynamo traces the LoRA model as one graph."""
    llm = _random_lora(phi3_base[0], "q_proj,o_proj")
    layer = llm.model.model.layers[0].self_attn.qkv_proj
    assert isinstance(layer, LoRALinear)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    x = torch.randn(2, 3, 128)
    with torch.no_grad():  # eager fp32 CPU linears run oneDNN, compiled ones F.linear: equal up to rounding
        assert torch.allclose(compiled(x), layer(x), atol=1e-5, rtol=1e-5)


def _cli(*args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "phi3", *args], capture_output=True, text=True, env=env, timeout=300)


def test_merge_writes_a_checkpoint_with_the_adapters_logits(phi3_base, tmp_path):
    """`phi3 merge`: the merged checkpoint (ours and transformers' loading) equals base + adapter."""
    from transformers import AutoModelForCausalLM

    folder, _ = phi3_base
    llm = _random_lora(folder, None)
    save_adapter(llm.model, tmp_path / "adapter")
    out = _cli("merge", "--model", str(folder), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged"))
    assert out.returncode == 0, out.stderr
    unmerged = _logits(llm.model)
    merged = _logits(phi3.load(tmp_path / "merged", dtype="float32").model)
    assert torch.allclose(merged, unmerged, atol=1e-5), (merged - unmerged).abs().max()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert torch.allclose(_logits(hf), unmerged, atol=1e-4)
    again = _cli("merge", "--model", str(folder), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged"))
    assert again.returncode == 2 and "not empty" in again.stderr


def test_merge_onto_a_gguf_llama_base(tmp_path):
    """A GGUF Llama base: the merged checkpoint is a transformers Llama (q/k/v apart, HF row order) with
    tokenizer files, and PEFT reads the adapter onto transformers' own load of the GGUF."""
    from gguf_fixture import tiny_phi3, write_gguf
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config, state = tiny_phi3(longrope=False, tied=True, num_key_value_heads=2)
    write_gguf(tmp_path / "tiny.gguf", config, state, arch="llama")
    llm = _random_lora(tmp_path / "tiny.gguf", "q_proj,k_proj,gate_proj,down_proj")
    save_adapter(llm.model, tmp_path / "adapter")
    ids = torch.tensor([[1, 5, 9, 33, 2, 60, 17, 4]])
    ours = _logits(llm.model, ids)
    phi3.merge(tmp_path / "tiny.gguf", tmp_path / "adapter", tmp_path / "merged")
    names = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert names["model_type"] == "llama" and names["architectures"] == ["LlamaForCausalLM"]
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert torch.allclose(_logits(hf, ids), ours, atol=1e-4), (_logits(hf, ids) - ours).abs().max()
    from_gguf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(from_gguf, tmp_path / "adapter").eval()
    assert torch.allclose(_logits(peft, ids), ours, atol=1e-4)
    merged_tok, base_tok = phi3.load_tokenizer(tmp_path / "merged"), phi3.load_tokenizer(tmp_path / "tiny.gguf")
    assert merged_tok.stop_ids == base_tok.stop_ids and merged_tok.bos_id == base_tok.bos_id


def test_packed_gguf_base_takes_a_lora_and_merges_into_a_plain_checkpoint(tmp_path):
    """A GGUF whose weights stay packed (Q4_0 blocks, tied Q4_0 embedding): a LoRA on its packed
    linears, merged, is a plain transformers checkpoint with base + adapter's logits."""
    from gguf.constants import GGMLQuantizationType
    from gguf_fixture import tiny_phi3, write_gguf
    from transformers import AutoModelForCausalLM

    from phi3.quantize import QuantLinear

    config, state = tiny_phi3(longrope=False, tied=True, num_key_value_heads=2)
    write_gguf(tmp_path / "q4.gguf", config, state, arch="llama", qtype=GGMLQuantizationType.Q4_0)
    llm = _random_lora(tmp_path / "q4.gguf", "q_proj,k_proj,gate_proj,down_proj")
    assert isinstance(llm.model.model.layers[0].mlp.down_proj.base, QuantLinear)  # the base stayed packed
    save_adapter(llm.model, tmp_path / "adapter")
    ids = torch.tensor([[1, 5, 9, 33, 2, 60, 17, 4]])
    ours = _logits(llm.model, ids)
    base = _logits(phi3.load(tmp_path / "q4.gguf", dtype="float32").model, ids)
    assert (ours - base).abs().max() > 1e-2  # the adapter does something
    phi3.merge(tmp_path / "q4.gguf", tmp_path / "adapter", tmp_path / "merged")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert torch.allclose(_logits(hf, ids), ours, atol=1e-4), (_logits(hf, ids) - ours).abs().max()
    merged = phi3.load(tmp_path / "merged", dtype="float32")
    assert not any(isinstance(m, QuantLinear) for m in merged.model.modules())
    assert torch.allclose(_logits(merged.model, ids), ours, atol=1e-4)


def test_dequantized_packed_model_is_the_same_model_in_float_modules(tmp_path):
    """Full fine-tuning and merging put float modules back: same logits, every weight a parameter."""
    from gguf.constants import GGMLQuantizationType
    from gguf_fixture import tiny_phi3, write_gguf

    from phi3.quantize import dequantize_model, dequantize_per_call

    config, state = tiny_phi3(longrope=False, tied=True, num_key_value_heads=2)
    write_gguf(tmp_path / "q8.gguf", config, state, arch="phi3", qtype=GGMLQuantizationType.Q8_0)
    llm = phi3.load(tmp_path / "q8.gguf", dtype="float32", prepare=dequantize_per_call)
    ids = torch.tensor([[1, 5, 9, 33, 2, 60, 17, 4]])
    packed = _logits(llm.model, ids)
    assert sum(p.numel() for p in llm.model.parameters()) < llm.config.num_parameters() / 10
    dequantize_model(llm.model)
    assert torch.equal(_logits(llm.model, ids), packed)
    assert sum(p.numel() for p in llm.model.parameters()) == llm.config.num_parameters()
    assert llm.model.lm_head.weight is llm.model.model.embed_tokens.weight


@pytest.mark.parametrize("asset", [assets.SMOLLM2_GGUF, assets.PHI3_VOCAB_GGUF], ids=["smollm2", "phi3-vocab"])
def test_gguf_tokenizer_saved_as_hugging_face_files(asset, tmp_path):
    """A GGUF vocabulary written as tokenizer files tokenizes and renders chats the same in transformers."""
    from transformers import AutoTokenizer

    tok = phi3.load_tokenizer(assets.fetch(asset))
    tok.save(tmp_path)
    hf, ours = AutoTokenizer.from_pretrained(tmp_path), phi3.load_tokenizer(tmp_path)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo  wörld 🎉 2+2=?"},
            {"role": "assistant", "content": " Four.\n\nDone"}]
    text = tok.apply_chat_template(chat, add_generation_prompt=False)
    assert hf.apply_chat_template(chat, tokenize=False) == text
    for sample in (text, "  plain text\twith 中文 and <|end|> tokens", "x"):
        for special in (True, False):
            want = tok.encode(sample, special)
            assert ours.encode(sample, special) == want == hf.encode(sample, add_special_tokens=special)
    assert ours.stop_ids == tok.stop_ids


def test_bad_adapters(phi3_base, tmp_path):
    folder, _ = phi3_base
    with pytest.raises(AdapterError, match="unknown target module 'q_prj'"):
        add_lora(phi3.load(folder, dtype="float32").model, "q_proj,q_prj")
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        phi3.load(folder, adapter=tmp_path)
    llm = _random_lora(folder, "o_proj")
    save_adapter(llm.model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(AdapterError, match="use_dora"):
        phi3.load(folder, adapter=tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors = {k.replace("layers.1.", "layers.7."): v for k, v in tensors.items()}  # a deeper model's adapter
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="layers.7.self_attn.o_proj.lora_A.weight is not a LoRA on a linear layer"):
        phi3.load(folder, adapter=tmp_path)


def test_save_pretrained_writes_a_packed_model_as_a_plain_checkpoint(tmp_path):
    """A GGUF whose Q8_0 blocks stay packed saves as float weights that transformers reads back."""
    from gguf.constants import GGMLQuantizationType
    from gguf_fixture import tiny_phi3, write_gguf
    from transformers import AutoModelForCausalLM

    from phi3.save import save_pretrained

    config, state = tiny_phi3(longrope=False, num_key_value_heads=2)
    write_gguf(tmp_path / "q8.gguf", config, state, arch="phi3", qtype=GGMLQuantizationType.Q8_0)
    llm = phi3.load(tmp_path / "q8.gguf", dtype="float32")
    ids = torch.tensor([[1, 5, 9, 33, 2, 60, 17, 4]])
    save_pretrained(llm, tmp_path / "plain", base=tmp_path / "q8.gguf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float32).eval()
    assert torch.allclose(_logits(hf, ids), _logits(llm.model, ids), atol=1e-4)
