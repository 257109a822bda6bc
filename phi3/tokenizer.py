"""Tokenizer: text <-> token ids, chat templates, stop ids, and UTF-8-safe streaming detokenization.

Everything runs on the ``tokenizers`` library; this module only decides how to build its pipeline.

Two sources, each matched against its own reference:

- A Hugging Face directory tokenizes exactly like transformers 5 ``AutoTokenizer.from_pretrained(dir)``,
  which is not always ``tokenizer.json`` read as is. When ``tokenizer_class`` is ``LlamaTokenizer``,
  transformers 5 rebuilds the pipeline from the config flags (no normalizer,
  ``Metaspace(prepend_scheme="first")`` for ``legacy: false``, BPE with byte fallback) -- unless
  ``config.json`` names a model type it overrides. Phi-3's ``phi3`` is one, so a full Phi-3 checkpoint
  uses its ``tokenizer.json`` as is, while a tokenizer-only directory is rebuilt. On Phi-3's vocabulary
  they differ where a space or a special token meets text: ``" Hello"`` is ``[29871, 15043]`` read as
  is, ``[15043]`` rebuilt. transformers 5 also ignores ``add_bos_token``/``add_eos_token`` whenever
  there is a ``tokenizer.json``: its post-processor decides, so Phi-3's adds ``<s>`` to plain text
  although its config says ``add_bos_token: false``. ``add_bos``/``add_eos`` report what encoding
  does. Rendered chat prompts carry their own special tokens: encode them with
  ``add_special_tokens=False``, as transformers' ``apply_chat_template(tokenize=True)`` does.
- A GGUF vocabulary tokenizes like llama.cpp (its ``ggml-vocab-*.gguf.out`` vectors): sentencepiece
  style gets a space before each stretch of text between special tokens, byte-level BPE is split with
  llama.cpp's regexes for the file's pre-tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_ADDED_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")
# Model types for which transformers 5 ignores a declared LlamaTokenizer and reads tokenizer.json as is
# (the Phi-3 family's entries of its MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS).
_TOKENIZER_JSON_AS_IS = {"phi3", "phi3_v", "phimoe"}

# llama.cpp's pre-tokenizer regexes for byte-level BPE vocabularies (llama-vocab.cpp), by tokenizer.ggml.pre.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_BPE_SPLITS = {
    **dict.fromkeys(["gpt-2", "phi-2", "mpt", "olmo"], [_GPT2_SPLIT]),
    **dict.fromkeys(["starcoder", "refact", "smollm", "command-r", "codeshell", "exaone", "minerva"],
                    [r"\p{N}", _GPT2_SPLIT]),
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"], [_LLAMA3_SPLIT]),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "stablelm2"], [_QWEN2_SPLIT]),
}
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"}  # llama.cpp's ignore_merges
_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values
# Tokens llama.cpp treats as end of generation by their text alone (llama-vocab.cpp), e.g. Phi-3's <|end|>
_EOG_TEXTS = {"<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>",
              "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>", "<｜end▁of▁sentence｜>"}


class ChatTemplateError(ValueError):
    """The messages, or the chat template itself, cannot be rendered."""


class Tokenizer:
    """Encodes and decodes text and renders chat templates (the module docstring names the references).

    ``vocab_size`` counts every id, added tokens included; ``bos_id``/``eos_id``/``pad_id`` are None when
    absent; ``stop_ids`` end generation; ``add_bos``/``add_eos`` say what ``encode(text)`` adds.
    """

    def __init__(self, backend: Backend, special_tokens: dict[str, str], chat_template: str | None,
                 stop_ids: Sequence[int] | None = None):
        self._backend = backend
        self._special_tokens = special_tokens  # e.g. {"bos_token": "<s>"}: what chat templates see
        self.chat_template = chat_template
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id, self.pad_id = (self._named_id(k) for k in ("bos_token", "eos_token", "pad_token"))
        self._special_ids = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
        self._anchor = backend.encode("a", add_special_tokens=False).ids[-1:]  # see StreamDecoder
        self._anchor_text = backend.decode(self._anchor)
        if stop_ids is None:
            stop_ids = [] if self.eos_id is None else [self.eos_id]
        self.stop_ids = frozenset(stop_ids)
        bare = backend.encode("", add_special_tokens=True).ids  # what the post-processor adds around text
        self.add_bos = self.bos_id is not None and bare[:1] == [self.bos_id]
        self.add_eos = self.eos_id is not None and bare[-1:] == [self.eos_id] and len(bare) > self.add_bos

    def _named_id(self, key: str) -> int | None:
        return self.token_to_id(self._special_tokens[key]) if key in self._special_tokens else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; special tokens written in the text are matched as tokens."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_offsets(self, text: str, add_special_tokens: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of ``text`` and each token's (start, end) character span in it (special tokens
        added by the post-processor span (0, 0))."""
        enc = self._backend.encode(text, add_special_tokens=add_special_tokens)
        return enc.ids, enc.offsets

    def save(self, folder: str | Path) -> None:
        """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``generation_config.json`` (the stop ids)
        into ``folder``: a Hugging Face tokenizer that transformers and ``load_tokenizer`` read as it
        is, whatever this one was built from (a GGUF vocabulary included)."""
        folder = Path(folder)
        (folder / "tokenizer.json").write_text(self._backend.to_str(), encoding="utf-8")
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                  **self._special_tokens, "chat_template": self.chat_template}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
        generation = {"bos_token_id": self.bos_id, "eos_token_id": sorted(self.stop_ids), "pad_token_id": self.pad_id}
        (folder / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; invalid UTF-8 from byte tokens becomes U+FFFD."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        """A fresh incremental detokenizer for one generated sequence."""
        return StreamDecoder(self, skip_special_tokens)

    def token_bytes(self, id: int, first: bool = False) -> bytes | None:
        """The bytes token ``id`` writes into decoded text (``skip_special_tokens``): after other text, or
        as the first token of a text (``first``: a SentencePiece decoder drops its leading space there).

        For a text, ``b"".join`` of its tokens' bytes is its UTF-8 (``first`` on the first token that is
        not special). A byte-fallback token ``<0xNN>`` and a byte-level piece of a character write their
        raw bytes (which decoding alone shows as U+FFFD). None for special tokens: they write nothing.
        """
        id = int(id)
        if id in self._special_ids:
            return None
        alone = first or not self._anchor_text  # else decoded behind the anchor, as StreamDecoder does mid-text
        text = self._backend.decode([id] if alone else self._anchor + [id])[0 if alone else len(self._anchor_text):]
        if "\ufffd" not in text:
            return text.encode()
        piece = self._backend.id_to_token(id) or ""
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        if piece and all(c in _BYTE_LEVEL for c in piece):  # a byte-level BPE piece: one character per byte
            return bytes(_BYTE_LEVEL[c] for c in piece)
        return text.encode()  # a token of U+FFFD itself

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string (vocabulary spelling, e.g. ``"▁Hello"``), or None."""
        return self._backend.token_to_id(token)

    def id_to_token(self, id: int) -> str | None:
        """Token string of an id, or None when out of range."""
        return self._backend.id_to_token(id)

    def is_special(self, id: int) -> bool:
        """True for added tokens flagged special (the ones ``skip_special_tokens`` drops)."""
        return id in self._special_ids

    def save(self, folder: str | Path) -> None:
        """Write Hugging Face tokenizer files (tokenizer.json, tokenizer_config.json, and
        generation_config.json with the stop ids) that `load_tokenizer(folder)` reads back as this
        tokenizer: how a GGUF's vocabulary travels into a safetensors checkpoint."""
        folder = Path(folder)
        self._backend.save(str(folder / "tokenizer.json"))
        added = {str(i): {"content": t.content, **{k: getattr(t, k) for k in _ADDED_TOKEN_FLAGS}}
                 for i, t in sorted(self._backend.get_added_tokens_decoder().items())}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self._special_tokens,
                  "added_tokens_decoder": added, "add_bos_token": self.add_bos, "add_eos_token": self.add_eos}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                      encoding="utf-8")
        generation = {"bos_token_id": self.bos_id, "eos_token_id": sorted(self.stop_ids)}
        (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tools: list | None = None,
                            **extra) -> str:
        """Render ``messages`` with the chat template, as transformers' ``apply_chat_template(tokenize=False)``.

        ``tools`` (OpenAI's function definitions), assistant messages with ``tool_calls`` and
        ``role: "tool"`` results go to the template as `phi3.tools.template_messages` says: as they
        are where the template reads ``tools``, else written into the roles every template knows.
        ``extra`` become template variables (they override ``bos_token`` and friends). Raises
        ``ChatTemplateError`` for malformed messages, a missing template, or one that fails or tries
        to leave the sandbox.
        """
        if self.chat_template is None:
            raise ChatTemplateError("this tokenizer has no chat template; format the prompt yourself")
        if isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages) and (
                tools or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)):
            from .tools import template_messages

            try:
                messages, variables = template_messages(messages, tools, self.chat_template)
            except (KeyError, TypeError, AttributeError) as e:
                raise ChatTemplateError(f"malformed tools or tool calls: {type(e).__name__}: {e}") from None
            extra = {**variables, **extra}
        _check_messages(messages)
        context = {"tools": None, "documents": None, **self._special_tokens, **extra,
                   "messages": [dict(m) for m in messages], "add_generation_prompt": add_generation_prompt}
        try:
            return _compile_template(self.chat_template).render(**context)
        except Exception as e:  # the template is untrusted code: any failure is the template's
            raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from e


class StreamDecoder:
    """Incremental detokenizer: feed ids one at a time, get text as soon as it is final.

    ``"".join(step(i) for i in ids) + flush() == tokenizer.decode(ids)``. Text is held back while it
    could still change: after a byte-fallback token (a run of ``<0xNN>`` tokens decodes all at once,
    or as one U+FFFD per byte if any of it is invalid) and while byte-level text ends in an
    incomplete character. Only the window since the last final boundary is re-decoded, behind an
    "anchor" token so that the decoder's strip-the-first-space rule does not fire mid-text.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._backend, self._skip = tokenizer._backend, skip_special_tokens
        self._special = tokenizer._special_ids
        self._anchor, self._anchor_text = tokenizer._anchor, tokenizer._anchor_text
        self._window: list[int] = []  # ids since the last final boundary
        self._at_start = True  # nothing final yet: the window is decoded alone, as the start of the text

    def _window_text(self) -> str:
        if self._at_start or not self._anchor_text:
            return self._backend.decode(self._window, skip_special_tokens=self._skip)
        text = self._backend.decode(self._anchor + self._window, skip_special_tokens=self._skip)
        return text[len(self._anchor_text):]

    def step(self, token_id: int) -> str:
        """Add one id; return the newly final text ("" while it may still change)."""
        token_id = int(token_id)
        self._window.append(token_id)
        token = self._backend.id_to_token(token_id) or ""
        if (self._skip and token_id in self._special) or (len(token) == 6 and token.startswith("<0x")):
            return ""  # a skipped token or a byte: the text before it may still change
        text = self._window_text()
        if not text or text.endswith("\ufffd"):  # nothing yet, or an incomplete byte-level character
            return ""
        self._window, self._at_start = [], False
        return text

    def flush(self) -> str:
        """The text held back (invalid bytes decode to U+FFFD, as in a full decode)."""
        text, self._window = self._window_text(), []
        self._at_start = self._at_start and not text
        return text


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer from a Hugging Face model directory or a ``.gguf`` file."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        from phi3.gguf import read_metadata  # lazy: reading GGUF pulls in numpy and the gguf package

        return tokenizer_from_gguf_metadata(read_metadata(path))
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path}: expected a directory with tokenizer.json, or a .gguf file")
    return _from_hf_dir(path)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _from_hf_dir(path: Path) -> Tokenizer:
    raw = (path / "tokenizer.json").read_text(encoding="utf-8")
    spec = json.loads(raw)
    config = {**_read_json(path / "special_tokens_map.json"), **_read_json(path / "tokenizer_config.json")}
    model_config = _read_json(path / "config.json")
    declared = (config.get("tokenizer_class") or model_config.get("tokenizer_class") or "").removesuffix("Fast")
    added = {int(i): t for i, t in config.get("added_tokens_decoder", {}).items()}
    defaults = {}
    # transformers' rule, byte-level files included (Llama-3-style repos that declare LlamaTokenizer)
    if (declared == "LlamaTokenizer" and model_config.get("model_type") not in _TOKENIZER_JSON_AS_IS
            and '"ByteLevel"' not in raw):
        spec = _transformers_llama_pipeline(spec, config)
        added = added or {t["id"]: t for t in spec["added_tokens"]}
        spec["added_tokens"] = []
        defaults = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}  # LlamaTokenizer's
    backend = Backend.from_str(json.dumps(spec))
    backend.add_tokens([_added_token(added[i]) for i in sorted(added)])
    # Named special tokens always end up special, with the flags of their added_tokens_decoder entry.
    named = {k: v for k, v in {**defaults, **config}.items() if k in _SPECIAL_TOKEN_KEYS and v}
    extras = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    by_content = {t["content"]: t for t in added.values()}
    to_mark = [*named.values(), *(extras.values() if isinstance(extras, dict) else extras)]
    backend.add_special_tokens([_added_token(by_content.get(_content(t), t), special=True) for t in to_mark])

    template = path / "chat_template.jinja"
    chat_template = template.read_text(encoding="utf-8") if template.is_file() else config.get("chat_template")
    if isinstance(chat_template, list):  # [{"name": ..., "template": ...}]: the default one is for chat
        chat_template = {t["name"]: t["template"] for t in chat_template}.get("default")
    return Tokenizer(backend, {k: _content(v) for k, v in named.items()}, chat_template, generation_stop_ids(path))


def generation_stop_ids(path: str | Path) -> list[int] | None:
    """The ids a model directory ends generation on: generation_config.json's ``eos_token_id`` (int or
    list), else config.json's; None when neither says."""
    path = Path(path)
    for name in ("generation_config.json", "config.json"):
        eos = _read_json(path / name).get("eos_token_id")
        if eos is None:
            continue
        ids = [eos] if isinstance(eos, int) else eos
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ValueError(f"{path / name}: eos_token_id must be an integer or a list of integers, got {eos!r}")
        return ids
    return None


def _transformers_llama_pipeline(spec: dict, config: dict) -> dict:
    """The pipeline transformers 5's LlamaTokenizer builds around tokenizer.json's vocabulary and merges."""
    if spec["model"].get("type") != "BPE":
        raise ValueError(f"LlamaTokenizer over a {spec['model'].get('type')} tokenizer.json is not supported")
    prefix = config.get("add_prefix_space")
    prefix = True if prefix is None else prefix
    scheme = ("always" if config.get("legacy") else "first") if prefix else "never"
    model = {**spec["model"], "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False}
    return {**spec, "model": model, "normalizer": None,
            "pre_tokenizer": json.loads(pre_tokenizers.Metaspace("▁", scheme, split=False).__getstate__()),
            "decoder": json.loads(_spm_decoder(strip=prefix).__getstate__())}


def _content(token: str | dict) -> str:
    return token["content"] if isinstance(token, dict) else str(token)


def _added_token(token: str | dict, **override) -> AddedToken:
    flags = {k: token[k] for k in _ADDED_TOKEN_FLAGS if isinstance(token, dict) and k in token}
    if isinstance(token, str):  # a bare special token string: transformers adds it unnormalized
        flags["normalized"] = False
    return AddedToken(_content(token), **{**flags, **override})


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: printable Latin-1 bytes stand for themselves, the
    others for the characters from U+0100 up, in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


_BYTE_LEVEL = _byte_level_alphabet()


def _spm_decoder(strip: bool) -> decoders.Decoder:
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    return decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] if strip else steps)


def tokenizer_from_gguf_metadata(metadata: dict[str, Any]) -> Tokenizer:
    """Build the tokenizer a GGUF file describes from its ``tokenizer.ggml.*`` metadata, with llama.cpp's semantics.

    Control tokens become special added tokens, user-defined ones plain added tokens (matched in text,
    kept by ``skip_special_tokens``). Stop ids: eos, eot, eom, and the tokens llama.cpp ends generation
    on by their text (``<|end|>``, ``<|im_end|>``, ...).
    """
    kind = metadata.get("tokenizer.ggml.model")
    tokens = list(metadata["tokenizer.ggml.tokens"])
    types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
    ids = {key: metadata.get(f"tokenizer.ggml.{key}_token_id") for key in ("bos", "eos", "padding", "unknown")}
    if kind == "llama":  # sentencepiece-style: merges implied by the scores, bytes as <0xNN>
        unk = tokens[ids["unknown"]] if ids["unknown"] is not None else None
        model = models.BPE(vocab, merges or _merges_from_scores(tokens, metadata["tokenizer.ggml.scores"], vocab),
                           unk_token=unk, fuse_unk=True, byte_fallback=True)
        backend = Backend(model)
        prefix = metadata.get("tokenizer.ggml.add_space_prefix", True)
        # as llama.cpp: a space before every stretch of text between added tokens, then spaces become ▁
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁")] * prefix + [normalizers.Replace(" ", "▁")])
        backend.decoder = _spm_decoder(strip=prefix)
    elif kind == "gpt2":  # byte-level BPE, split first with llama.cpp's regexes for this vocabulary
        pre = metadata.get("tokenizer.ggml.pre", "gpt-2")
        if pre not in _BPE_SPLITS:
            raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported (known: {sorted(_BPE_SPLITS)})")
        backend = Backend(models.BPE(vocab, merges, ignore_merges=pre in _IGNORE_MERGES))
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), "isolated") for r in _BPE_SPLITS[pre]]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        backend.decoder = decoders.ByteLevel()
    else:
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (only 'llama' and 'gpt2')")

    # Phi-3 (recognised by its role tokens): the Hugging Face tokenizer strips whitespace after its
    # special tokens except <unk>, <s> and <|endoftext|> (so "\n" after "<|user|>" is absorbed); GGUF
    # does not carry that flag, llama.cpp sets it the same way.
    phi3 = "<|end|>" in vocab and "<|assistant|>" in vocab
    backend.add_tokens([
        AddedToken(t, special=ty == _GGUF_CONTROL, normalized=False,
                   rstrip=phi3 and t not in ("<unk>", "<s>", "<|endoftext|>"))
        for t, ty in zip(tokens, types) if ty in (_GGUF_CONTROL, _GGUF_USER_DEFINED)])

    named = {"bos_token": ids["bos"], "eos_token": ids["eos"], "pad_token": ids["padding"], "unk_token": ids["unknown"]}
    special = {k: tokens[i] for k, i in named.items() if i is not None and 0 <= i < len(tokens)}
    single, around = "$A:0", {}
    if metadata.get("tokenizer.ggml.add_bos_token", kind == "llama") and ids["bos"] is not None:
        single, around[tokens[ids["bos"]]] = f"{tokens[ids['bos']]}:0 {single}", ids["bos"]
    if metadata.get("tokenizer.ggml.add_eos_token", False) and ids["eos"] is not None:
        single, around[tokens[ids["eos"]]] = f"{single} {tokens[ids['eos']]}:0", ids["eos"]
    backend.post_processor = processors.TemplateProcessing(single=single, special_tokens=list(around.items()))
    stops = [i for i in (ids["eos"], metadata.get("tokenizer.ggml.eot_token_id"),
                         metadata.get("tokenizer.ggml.eom_token_id")) if i is not None]
    stops += [vocab[t] for t in _EOG_TEXTS if t in vocab]
    if phi3:  # Phi-3's generation_config also stops on <|assistant|> (32001): a new turn has begun
        stops.append(vocab["<|assistant|>"])
    return Tokenizer(backend, special, metadata.get("tokenizer.chat_template"), stops)


def _merges_from_scores(tokens: list[str], scores: Sequence[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to sentencepiece's highest-score-first merging (transformers' ordering):
    every split of a piece into two vocabulary pieces, by descending (score, left length, right
    length), ties in piece order, then by (left id, right id). One sort of flat arrays: a 32k
    vocabulary takes tens of milliseconds, not half a second of per-piece sorting."""
    import numpy as np

    get = vocab.get
    lefts, rights, keys = [], [], []  # keys: (score, piece order, left length, left id, right id)
    for n, (piece, score) in enumerate(dict(zip(tokens, scores)).items()):  # first place, last score
        for i in range(1, len(piece)):
            left_id, right_id = get(piece[:i]), get(piece[i:])
            if left_id is not None and right_id is not None:
                lefts.append(piece[:i])
                rights.append(piece[i:])
                keys.append((score, n, i, len(piece) - i, left_id, right_id))
    if not keys:
        return []
    score, n, left_len, right_len, left_id, right_id = np.array(keys, dtype=np.float64).T
    order = np.lexsort((right_id, left_id, n, -right_len, -left_len, -score))  # last key sorts first
    return [(lefts[k], rights[k]) for k in order.tolist()]


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError(f"messages must be a non-empty list of dicts, got {type(messages).__name__}")
    for n, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatTemplateError(f"messages[{n}] must be a dict, got {type(m).__name__}")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise ChatTemplateError(f"messages[{n}][{key!r}] must be a string, got {type(m.get(key)).__name__}")


@lru_cache(maxsize=16)
def _compile_template(source: str):
    """Compile in an immutable sandbox with the settings and helpers transformers gives chat templates."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    # transformers' tojson keeps non-ASCII and does not escape HTML characters
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(source)
