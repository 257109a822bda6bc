"""Chat templates rendered byte-identically to transformers' apply_chat_template(tokenize=False), and the
sandbox and validation errors."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer
from vocab_fixture import PHI3_TOKENIZER_CONFIG, write_phi3_tokenizer_dir

from phi3 import assets
from phi3.tokenizer import ChatTemplateError, load_tokenizer

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hello!"}],
    "system-user": [SYSTEM, {"role": "user", "content": "What is 2 + 2?"}],
    "multi-turn": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
                   {"role": "user", "content": "Tell me a joke."}],
    "few-shot": [SYSTEM, {"role": "user", "content": "cat ->"}, {"role": "assistant", "content": "chat"},
                 {"role": "user", "content": "dog ->"}, {"role": "assistant", "content": "chien"},
                 {"role": "user", "content": "bird ->"}],
    "ends-with-assistant": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}],
    "awkward-content": [{"role": "user", "content": "{{ not a template }} {% raw %} <|end|>\n\n  日本語 🦙 \t"},
                        {"role": "assistant", "content": ""}, {"role": "user", "content": "'quotes' \"and\" \\"}],
}


@pytest.fixture(scope="session")
def phi3(tmp_path_factory):
    folder = write_phi3_tokenizer_dir(tmp_path_factory.mktemp("phi3_chat"))
    return load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_phi3_template_matches_transformers(phi3, name, add_generation_prompt):
    mine, ref = phi3
    messages = CONVERSATIONS[name]
    expected = ref.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert mine.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


def test_default_adds_the_generation_prompt(phi3):
    mine, ref = phi3
    messages = CONVERSATIONS["user"]
    assert mine.apply_chat_template(messages) == ref.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False)


# Exercises what transformers gives templates: trim/lstrip blocks, loop controls, namespace, tojson
# (non-ASCII kept), special-token variables, extra keyword variables, raise_exception.
RICH_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(n=0) %}
{% for m in messages %}
    {% if m['role'] == 'tool' %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
    <{{ m['role'] | upper }}:{{ ns.n }}>{{ m['content'] | trim }}{{ eos_token if loop.last else '' }}
    {% if m['content'] == 'STOP' %}{% break %}{% endif %}
{% endfor %}
{{ {'meta': greeting, 'unk': unk_token, 'pad': pad_token} | tojson }}
{% if tools is not none or documents is not none %}{{ raise_exception('no tools here') }}{% endif %}
{% if add_generation_prompt %}<ASSISTANT>{% endif %}"""


def test_chat_template_jinja_file_and_extra_variables(tmp_path):
    folder = write_phi3_tokenizer_dir(tmp_path / "rich")
    (folder / "chat_template.jinja").write_text(RICH_TEMPLATE)  # takes precedence over tokenizer_config's
    mine, ref = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    messages = [SYSTEM, {"role": "tool", "content": "x"}, {"role": "user", "content": "  Grüße  "},
                {"role": "assistant", "content": "STOP"}, {"role": "user", "content": "after"}]
    for agp in (True, False):
        expected = ref.apply_chat_template(messages, add_generation_prompt=agp, tokenize=False, greeting="héllo")
        assert mine.apply_chat_template(messages, add_generation_prompt=agp, greeting="héllo") == expected
    # an extra variable overrides a special token, as in transformers
    expected = ref.apply_chat_template(messages, tokenize=False, greeting=1, bos_token="[BOS]")
    assert mine.apply_chat_template(messages, add_generation_prompt=False, greeting=1, bos_token="[BOS]") == expected


@pytest.mark.parametrize("asset", ["PHI3_VOCAB_GGUF", "SMOLLM2_GGUF"])
def test_gguf_templates_match_transformers(asset):
    path = assets.fetch(getattr(assets, asset))
    mine, ref = load_tokenizer(path), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for messages in CONVERSATIONS.values():
        for agp in (True, False):
            expected = ref.apply_chat_template(messages, add_generation_prompt=agp, tokenize=False)
            assert mine.apply_chat_template(messages, add_generation_prompt=agp) == expected


# Templates that transformers also refuses to render: escapes, mutation, raise_exception, bad syntax.
BAD_TEMPLATES = {
    "dunder": "{{ ''.__class__.__mro__ }}",
    "subclasses": "{{ ().__class__.__base__.__subclasses__() }}",
    "globals": "{{ raise_exception.__globals__ }}{{ raise_exception.__globals__['os'] }}",
    "mutation": "{{ messages.append({'role': 'user', 'content': 'x'}) }}",
    "raise": "{{ raise_exception('Conversation roles must alternate') }}",
    "syntax": "{% for m in messages %}{{ m['content'] }",
}


@pytest.mark.parametrize("name", BAD_TEMPLATES)
def test_bad_templates_raise_chat_template_error(phi3, name):
    mine, ref = phi3
    template = BAD_TEMPLATES[name]
    with pytest.raises(Exception):
        ref.apply_chat_template(CONVERSATIONS["user"], chat_template=template, tokenize=False)
    mine.chat_template = template
    try:
        with pytest.raises(ChatTemplateError) as info:
            mine.apply_chat_template(CONVERSATIONS["user"])
    finally:
        mine.chat_template = PHI3_TOKENIZER_CONFIG["chat_template"]
    if name == "raise":
        assert "Conversation roles must alternate" in str(info.value)


@pytest.mark.parametrize("messages", [
    "just a string", [], [("user", "hi")], [{"content": "no role"}], [{"role": "user"}],
    [{"role": "user", "content": None}], [{"role": "user", "content": 3}], [{"role": 1, "content": "x"}],
], ids=["string", "empty", "tuple", "no-role", "no-content", "none-content", "int-content", "int-role"])
def test_malformed_messages_are_rejected(phi3, messages):
    with pytest.raises(ChatTemplateError, match="messages"):
        phi3[0].apply_chat_template(messages)


def test_no_template_is_a_clear_error(tmp_path):
    config = {k: v for k, v in PHI3_TOKENIZER_CONFIG.items() if k != "chat_template"}
    folder = write_phi3_tokenizer_dir(tmp_path / "plain", config)
    assert json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template") is None
    with pytest.raises(ValueError):  # transformers refuses too
        AutoTokenizer.from_pretrained(folder).apply_chat_template(CONVERSATIONS["user"], tokenize=False)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        load_tokenizer(folder).apply_chat_template(CONVERSATIONS["user"])
