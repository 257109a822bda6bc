"""Finding and loading checkpoints: aliases and hub ids through huggingface_hub's cache, bad files."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import phi3
from phi3.config import ConfigError, Phi3Config
from phi3.weights import ModelNotFoundError, WeightsError, resolve
from conftest import tiny_config, write_checkpoint


@pytest.fixture
def ckpt(tmp_path):
    folder = tmp_path / "model"
    ref = write_checkpoint(folder, "gqa", seed=1)
    return folder, ref


# -- the hub path, against a local stand-in of the hub cache -----------------------------------------
def _fake_hub_cache(cache, repo: str, src) -> None:
    """Lay out `src` the way huggingface_hub caches a snapshot of `repo` at revision main."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / ("0" * 40)
    shutil.copytree(src, snap)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text("0" * 40)


@pytest.mark.parametrize("name", ["microsoft/Phi-3-mini-4k-instruct", "phi-3-mini-4k-instruct", "PHI-3-mini-4k-instruct"])
def test_hub_id_and_alias_resolve_through_hub_cache(ckpt, tmp_path, monkeypatch, name):
    folder, ref = ckpt
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "microsoft/Phi-3-mini-4k-instruct", folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    path = resolve(name)
    assert path.parent.parent.name.startswith("models--microsoft--Phi-3-mini-4k-instruct")
    llm = phi3.load(name, dtype="float32")
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    with torch.no_grad():
        assert torch.allclose(llm.logits(ids), ref(torch.tensor([ids])).logits[0], atol=1e-4)


def test_unreachable_hub_without_cache_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError) as e:
        phi3.load("phi-3-mini-128k-instruct")
    msg = str(e.value)
    assert "microsoft/Phi-3-mini-128k-instruct" in msg and "hf download microsoft/Phi-3-mini-128k-instruct" in msg
    assert "HF_HUB_OFFLINE" in msg and "smollm2-135m-instruct" in msg and "\n" not in msg


def test_unknown_name_is_refused_clearly(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not a local path"):
        resolve("no-such-model")
    for path in (tmp_path / "missing" / "dir", tmp_path / "model.gguf", "./model.gguf", "model.gguf"):
        with pytest.raises(ModelNotFoundError, match=f"^{re.escape(str(path))}: no such file or directory$"):
            resolve(str(path))


def test_device_and_dtype_defaults(ckpt):
    folder, _ = ckpt
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "bfloat16"}))
    llm = phi3.load(folder)
    assert llm.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    # CPU: fp32 whatever the checkpoint says (bf16 changes answers); GPU: the checkpoint's own.
    assert llm.dtype == (torch.bfloat16 if llm.device.type == "cuda" else torch.float32)
    assert phi3.load(folder, dtype=torch.float32).dtype == torch.float32
    assert phi3.load(folder, dtype="bf16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        phi3.load(folder, dtype="int3")
    with pytest.raises(ValueError, match="attn_implementation"):
        phi3.load(folder, attn_implementation="magic")
    assert isinstance(llm.model, torch.nn.Module) and isinstance(llm.config, Phi3Config)


def test_devices_this_machine_lacks_are_refused_before_loading(tmp_path):
    """A clear ValueError from the library (the CLI prints it as one line), before the model is looked for."""
    missing = tmp_path / "no-such-model"  # never reached: the device is checked first
    with pytest.raises(ValueError, match=r"unknown device 'tpu'; use cpu, cuda, cuda:N or mps"):
        phi3.load(missing, device="tpu")
    with pytest.raises(ValueError, match="unknown device 'cuda:x'"):
        phi3.load(missing, device="cuda:x")
    count = torch.cuda.device_count() if torch.version.cuda or torch.version.hip else 0
    expected = "built without CUDA" if not (torch.version.cuda or torch.version.hip) else \
        "no CUDA GPU is visible" if count == 0 else f"there is no GPU {count}"
    with pytest.raises(ValueError, match=expected):
        phi3.load(missing, device=f"cuda:{count}")
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        phi3.load(missing, device="cpu", dtype="fp8")


# -- bad input ----------------------------------------------------------------------------------------
def test_weights_read_from_the_file_are_cache_line_aligned(ckpt):
    """A CPU load in the file's own dtype takes tensors straight from the mapped safetensors file,
    where data sits at 8-byte offsets; those not 64-byte aligned are copied (the CPU kernels' vector
    loads would split cache lines: an fp32 decode step ran 15-25% slower), with the same values."""
    from safetensors import safe_open

    folder, _ = ckpt
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
        assert any(t.data_ptr() % 64 for t in stored.values())  # the file has such tensors
        llm = phi3.load(folder, dtype="float32")
    assert {t.dtype for t in stored.values()} == {torch.float32}
    state = llm.model.state_dict()
    for k, t in stored.items():
        assert state[k].data_ptr() % 64 == 0 and torch.equal(state[k], t), k


def test_missing_config(ckpt):
    folder, _ = ckpt
    (folder / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json"):
        phi3.load(folder)


def test_missing_weights_and_refused_pickle(ckpt):
    folder, _ = ckpt
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(WeightsError, match="pickled checkpoints are refused"):
        phi3.load(folder)


def test_missing_shard(tmp_path):
    folder = tmp_path / "sharded"
    write_checkpoint(folder, "window", max_shard_size="50KB")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(WeightsError, match=shard.name):
        phi3.load(folder)


def test_truncated_safetensors(ckpt):
    folder, _ = ckpt
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(WeightsError, match="model.safetensors"):
        phi3.load(folder)


def test_garbage_header(ckpt):
    folder, _ = ckpt
    (folder / "model.safetensors").write_bytes(b"\xff" * 8 + b"{not json")
    with pytest.raises(WeightsError, match="model.safetensors"):
        phi3.load(folder)


def test_misshaped_and_missing_tensors(ckpt):
    folder, _ = ckpt
    f = folder / "model.safetensors"
    state = load_file(f)
    state["model.layers.0.mlp.down_proj.weight"] = state["model.layers.0.mlp.down_proj.weight"][:, :-1].contiguous()
    del state["model.norm.weight"]
    state["model.extra.weight"] = torch.zeros(2)
    save_file(state, f)
    with pytest.raises(WeightsError) as e:
        phi3.load(folder)
    msg = str(e.value)
    assert "model.layers.0.mlp.down_proj.weight" in msg and "model.norm.weight" in msg and "model.extra.weight" in msg


def test_config_that_lies_about_shapes(ckpt):
    folder, _ = ckpt
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] += 8
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="intermediate_size"):
        phi3.load(folder)


@pytest.mark.parametrize("change,field", [
    ({"model_type": "phi3small"}, "model_type"),
    ({"model_type": "gpt2"}, "model_type"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"hidden_size": -1}, "hidden_size"),
    ({"vocab_size": "big"}, "vocab_size"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}}, "rope_scaling.short_factor"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling.type"),
    ({"quantization": "int4"}, "quantization"),
])
def test_bad_config_fields_are_named(change, field):
    d = {"model_type": "phi3", **tiny_config("gqa"), **change}
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        Phi3Config.from_dict(d, source="config.json")


def test_config_keeps_quantization_and_ignores_other_unknown_keys():
    d = {"model_type": "phi3", **tiny_config("gqa"), "quantization": {"bits": 4, "group_size": 32}, "foo": 1}
    config = Phi3Config.from_dict(d)
    assert config.quantization == {"bits": 4, "group_size": 32} and not hasattr(config, "foo")


def test_config_accepts_old_and_new_rope_fields():
    d = {"model_type": "phi3", **tiny_config("longrope")}
    old = Phi3Config.from_dict({**d, "rope_scaling": {**d["rope_scaling"], "type": "su"}})
    new_fields = {k: v for k, v in d.items() if k not in ("rope_scaling", "rope_theta")}
    new = Phi3Config.from_dict({**new_fields, "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                                                                  **{k: d["rope_scaling"][k] for k in ("short_factor", "long_factor")}}})
    assert old.rope_scaling == new.rope_scaling and old.rope_theta == new.rope_theta == 10000.0
    plain = Phi3Config.from_dict({**new_fields, "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}})
    assert plain.rope_scaling is None and plain.rope_theta == 500.0


def test_misshaped_tensor_in_a_shard_names_the_shard(tmp_path):
    folder = tmp_path / "sharded"
    write_checkpoint(folder, "window", max_shard_size="50KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    key = "model.layers.1.self_attn.o_proj.weight"
    shard = folder / index["weight_map"][key]
    state = load_file(shard)
    state[key] = state[key][:-1].contiguous()
    save_file(state, shard)
    with pytest.raises(WeightsError, match=rf"{key} \({shard.name}\)"):
        phi3.load(folder)


def test_hub_cache_is_used_when_the_hub_is_unreachable(ckpt, tmp_path, monkeypatch):
    """Not offline mode: the hub is tried (a closed local port stands in for it), then the cache serves."""
    folder, _ = ckpt
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "microsoft/Phi-3-mini-4k-instruct", folder)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr("huggingface_hub.constants.HUGGINGFACE_CO_URL_TEMPLATE",
                        "http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}")
    assert resolve("phi-3-mini-4k-instruct").parent.parent.name == "models--microsoft--Phi-3-mini-4k-instruct"


def test_llama_layout_checkpoint_is_fused_on_load(tmp_path):
    """A Hugging Face Llama checkpoint (separate q/k/v and gate/up, GQA) runs as the same model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import randomize

    torch.manual_seed(0)
    ref = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, rope_theta=1e5,
                                       max_position_embeddings=128, tie_word_embeddings=True)).eval()
    randomize(ref, seed=2)
    ref.save_pretrained(tmp_path)
    llm = phi3.load(tmp_path, dtype="float32")
    assert llm.config.model_type == "llama" and llm.config.tie_word_embeddings
    ids = list(range(7, 60))
    with torch.no_grad():
        assert torch.allclose(llm.logits(ids), ref(torch.tensor([ids])).logits[0], atol=1e-4)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.1.self_attn.v_proj.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(WeightsError, match="v_proj"):
        phi3.load(tmp_path)


def test_bare_checkpoint_stops_on_its_generation_config(ckpt):
    folder, _ = ckpt
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 9]}))
    assert phi3.load(folder).stop_ids == {5, 9}
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": "five"}))
    with pytest.raises(ValueError, match="eos_token_id"):
        phi3.load(folder)
