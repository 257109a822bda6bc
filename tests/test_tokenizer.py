"""Tokenizer parity with the references: Hugging Face directories against transformers 5's AutoTokenizer,
GGUF vocabularies against llama.cpp's own vectors and transformers' GGUF tokenizer, streaming against
full decoding."""

from __future__ import annotations

import json
import random
from functools import cache
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoConfig, AutoTokenizer, GenerationConfig
from vocab_fixture import LLAMA_CPP_VOCABS, PHI3_TOKENIZER_CONFIG, llama_cpp_vectors, llama_cpp_vocab, write_phi3_tokenizer_dir

from phi3 import assets
from phi3.tokenizer import load_tokenizer

TEXTS = [
    "", "Hello world", " Hello world", "Hello  world", "   leading", "trailing   ", "a\tb\t\tc", "\n", "line\n\nbreaks\n",
    " \n \n", "<|user|>\nHi<|end|>\n<|assistant|>\n", "<|system|>\nYou are helpful.<|end|>\n<|user|>\n  two spaces<|end|>",
    "<|user|> \n\t inline after tag", "<s>bos in text</s>  after eos", "</s>\n\n<|endoftext|>  z", "x<|end|>y<|end|>",
    "<|placeholder1|>\n\n<|placeholder6|>", "<|assistant|>", "<|fake|> <|user", "日本語のテキストと中文", "🦙🚀 emoji 😶‍🌫️ ✅",
    "Ünïcödé àccents naïve café", "\u0b95\u0bbe\u0ba9\u0bcd Tamil", "control \x00\x01\x7f chars", "ሰላም", "12345 + 0.5 = 12345.5",
    "I'm   x  1 2  3", "  ", "<<|user|>>", "\r\nwindows\r\n",
]


def _phi3_checkpoint_config(folder: Path) -> None:
    # A full Phi-3 checkpoint has config.json with model_type phi3; transformers 5 then reads tokenizer.json as is.
    (folder / "config.json").write_text(json.dumps({"model_type": "phi3", "bos_token_id": 1, "eos_token_id": 32000}))


@pytest.fixture(scope="session")
def phi3_dirs(tmp_path_factory) -> dict[str, Path]:
    """The real Phi-3 tokenizer directory, in variants that take different paths through transformers 5."""
    root = tmp_path_factory.mktemp("phi3_tokenizers")
    variants = {
        "rebuilt": None,  # no config.json: LlamaTokenizer rebuilds the pipeline from the flags
        "checkpoint": None,
        "bos-eos-flags": {**PHI3_TOKENIZER_CONFIG, "add_bos_token": True, "add_eos_token": True},
        "legacy": {**PHI3_TOKENIZER_CONFIG, "legacy": True},
        "no-prefix-space": {**PHI3_TOKENIZER_CONFIG, "add_prefix_space": False},
        "eos-is-</s>": {**PHI3_TOKENIZER_CONFIG, "eos_token": "</s>"},  # a named token becomes special
    }
    dirs = {name: write_phi3_tokenizer_dir(root / name, config) for name, config in variants.items()}
    _phi3_checkpoint_config(dirs["checkpoint"])
    return dirs


@cache
def _reference(path: Path, gguf_file: str | None = None):
    return AutoTokenizer.from_pretrained(path, gguf_file=gguf_file) if gguf_file else AutoTokenizer.from_pretrained(path)


def _random_ids(vocab_size: int, seed: int, n: int = 100) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(rng.randint(1, 20))] for _ in range(n)]


VARIANTS = ["rebuilt", "checkpoint", "bos-eos-flags", "legacy", "no-prefix-space", "eos-is-</s>"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_dir_matches_transformers(phi3_dirs, variant):
    mine, ref = load_tokenizer(phi3_dirs[variant]), _reference(phi3_dirs[variant])
    for text in TEXTS:
        for special in (True, False):
            assert mine.encode(text, special) == ref.encode(text, add_special_tokens=special), (text, special)
    sequences = [ref.encode(t) for t in TEXTS] + _random_ids(len(ref), seed=len(variant))
    for ids in sequences:
        for skip in (False, True):
            assert mine.decode(ids, skip) == ref.decode(ids, skip_special_tokens=skip), (ids, skip)
    assert (mine.vocab_size, mine.bos_id, mine.eos_id, mine.pad_id) == (
        len(ref), ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    assert {i for i in range(mine.vocab_size) if mine.is_special(i)} == {
        i for i, t in ref.added_tokens_decoder.items() if t.special}
    for i in (0, 1, 2, 13, 259, 29871, 31999, 32000, 32007, 32010, 32063):
        assert mine.id_to_token(i) == ref.convert_ids_to_tokens(i)
        assert mine.token_to_id(mine.id_to_token(i)) == ref.convert_tokens_to_ids(ref.convert_ids_to_tokens(i))
    # add_bos/add_eos report what encoding does (transformers 5's own flags may not)
    bare = ref.encode("x")
    assert (mine.add_bos, mine.add_eos) == (bare[0] == ref.bos_token_id, bare[-1] == ref.eos_token_id)


def test_flags_in_tokenizer_config_do_not_override_tokenizer_json(phi3_dirs):
    """transformers 5 lets tokenizer.json's post-processor decide BOS/EOS, whatever tokenizer_config says."""
    for variant in ("rebuilt", "bos-eos-flags"):
        ref = _reference(phi3_dirs[variant])
        assert load_tokenizer(phi3_dirs[variant]).encode("Hi") == ref.encode("Hi") == [1, *ref.encode("Hi", add_special_tokens=False)]


def test_the_phi3_trap_rebuilt_pipeline_differs_from_the_checkpoint(phi3_dirs):
    """Same files, different tokens: the difference comes from config.json, as in transformers."""
    rebuilt, checkpoint = load_tokenizer(phi3_dirs["rebuilt"]), load_tokenizer(phi3_dirs["checkpoint"])
    assert rebuilt.encode(" Hello", False) != checkpoint.encode(" Hello", False)
    assert rebuilt.encode("Hello world", False) == checkpoint.encode("Hello world", False)


def test_stop_ids_follow_generation_config_then_config(phi3_dirs, tmp_path):
    folder = phi3_dirs["checkpoint"]
    assert load_tokenizer(folder).stop_ids == frozenset(GenerationConfig.from_pretrained(folder).eos_token_id)
    bare = write_phi3_tokenizer_dir(tmp_path / "bare")
    (bare / "generation_config.json").unlink()
    assert load_tokenizer(bare).stop_ids == frozenset({_reference(phi3_dirs["rebuilt"]).eos_token_id})
    (bare / "config.json").write_text(json.dumps({"model_type": "phi3", "eos_token_id": 32007}))
    # what transformers generates with when a model has no generation_config.json
    expected = GenerationConfig.from_model_config(AutoConfig.from_pretrained(bare)).eos_token_id
    assert load_tokenizer(bare).stop_ids == frozenset({expected}) == {32007}


def test_missing_files_are_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------- GGUF vocabularies

@pytest.mark.parametrize("name", LLAMA_CPP_VOCABS)
def test_llama_cpp_vectors(name):
    tok = load_tokenizer(llama_cpp_vocab(name))
    vectors = llama_cpp_vectors(name)
    assert len(vectors) == 47
    for text, ids in vectors:
        assert tok.encode(text, add_special_tokens=False) == ids, text


@pytest.fixture(scope="session")
def phi3_gguf():
    path = assets.fetch(assets.PHI3_VOCAB_GGUF)
    return load_tokenizer(path), _reference(path.parent, path.name)


def test_phi3_gguf_matches_transformers_gguf(phi3_gguf):
    """Equal to transformers reading the GGUF, except that we also strip whitespace after Phi-3's
    special tokens (Hugging Face's and llama.cpp's rule, which the GGUF does not record) and keep
    </s> non-special (transformers' GGUF path marks it special by accident of its LlamaTokenizer default)."""
    mine, ref = phi3_gguf
    texts = [t for t in TEXTS if "|>" not in t and "</s>" not in t] + ["<|user|>Hi<|end|><|assistant|>"]
    for text in texts:
        for special in (True, False):
            assert mine.encode(text, special) == ref.encode(text, add_special_tokens=special), text
    for ids in [ref.encode(t) for t in texts] + _random_ids(len(ref), seed=1):
        ids = [i for i in ids if i != 2]
        for skip in (False, True):
            assert mine.decode(ids, skip) == ref.decode(ids, skip_special_tokens=skip)
    assert (mine.vocab_size, mine.bos_id, mine.eos_id, mine.pad_id, mine.add_bos) == (
        len(ref), ref.bos_token_id, ref.eos_token_id, ref.pad_token_id, True)
    # eos plus what llama.cpp ends generation on by token text (<|end|> closes a Phi-3 turn, </s> too),
    # plus <|assistant|>, which Phi-3's generation_config.json also stops on
    assert mine.stop_ids == {ref.eos_token_id, *ref.convert_tokens_to_ids(["<|end|>", "</s>", "<|assistant|>"])}


def test_phi3_gguf_matches_the_hf_checkpoint(phi3_gguf, phi3_dirs):
    """llama.cpp semantics plus the rstrip rule equal transformers on a Phi-3 checkpoint directory, everywhere."""
    mine, ref = phi3_gguf[0], _reference(phi3_dirs["checkpoint"])
    for text in TEXTS:
        for special in (True, False):
            assert mine.encode(text, special) == ref.encode(text, add_special_tokens=special), text
    for ids in [ref.encode(t) for t in TEXTS] + _random_ids(len(ref), seed=2):
        for skip in (False, True):
            assert mine.decode(ids, skip) == ref.decode(ids, skip_special_tokens=skip)


@pytest.fixture(scope="session")
def smollm2():
    path = assets.fetch(assets.SMOLLM2_GGUF)
    return load_tokenizer(path), _reference(path.parent, path.name)


def test_smollm2_gguf_matches_transformers_gguf(smollm2):
    mine, ref = smollm2
    # transformers' GGUF path drops SmolLM2's digit splitting; compare it where digits do not occur
    for text in [t for t in TEXTS if not any(c.isdigit() for c in t)] + ["<|im_start|>user\nHi<|im_end|>\n"]:
        for special in (True, False):
            assert mine.encode(text, special) == ref.encode(text, add_special_tokens=special), text
    for ids in [ref.encode(t) for t in TEXTS] + _random_ids(len(ref), seed=3):
        for skip in (False, True):
            assert mine.decode(ids, skip) == ref.decode(ids, skip_special_tokens=skip)
    assert (mine.vocab_size, mine.bos_id, mine.eos_id, mine.pad_id, mine.add_bos) == (
        len(ref), ref.bos_token_id, ref.eos_token_id, ref.pad_token_id, False)
    assert mine.stop_ids == {ref.convert_tokens_to_ids("<|im_end|>"), ref.convert_tokens_to_ids("<|endoftext|>")}


def test_smollm2_gguf_splits_digits_like_its_own_tokenizer_json(smollm2):
    """SmolLM2's tokenizer.json pre-tokenizes with Digits(individual) then ByteLevel (as llama.cpp's "smollm")."""
    from tokenizers import Tokenizer, pre_tokenizers

    mine, ref = smollm2
    original = Tokenizer.from_str(ref.backend_tokenizer.to_str())
    original.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    for text in TEXTS + ["In 2024, 12345 apples cost $3.50 (x10)", "a 55 b  7"]:
        assert mine.encode(text, False) == original.encode(text, add_special_tokens=False).ids, text


# ---------------------------------------------------------------- streaming


@pytest.fixture(scope="session")
def tokenizers_for_streaming(phi3_dirs, phi3_gguf, smollm2):
    """name -> (tokenizer, a hypothesis strategy for ids that stress it: bytes, specials, emoji, random)."""
    out = {}
    for name, tok in {"phi3-rebuilt": load_tokenizer(phi3_dirs["rebuilt"]), "phi3-gguf": phi3_gguf[0],
                      "phi3-checkpoint": load_tokenizer(phi3_dirs["checkpoint"]), "smollm2": smollm2[0]}.items():
        special = [i for i in range(tok.vocab_size) if tok.is_special(i)]
        byte_ids = [i for i in range(tok.vocab_size) if (tok.id_to_token(i) or "").startswith("<0x")]
        token = st.one_of(st.integers(0, tok.vocab_size - 1), st.sampled_from(byte_ids or [0]),
                          st.sampled_from(special), st.sampled_from(tok.encode(STREAM_TEXT, False)))
        out[name] = tok, st.lists(token, max_size=30)
    return out


def _stream(tok, ids, skip):
    decoder = tok.decoder(skip)
    return [decoder.step(i) for i in ids], decoder.flush()


STREAM_TEXT = "🦙 日本語 ½ héllo  \n\t🚀😶‍🌫️ ✅ Ελληνικά x"


@pytest.mark.parametrize("name", ["phi3-rebuilt", "phi3-checkpoint", "phi3-gguf", "smollm2"])
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_stream_decoder_equals_full_decode(tokenizers_for_streaming, name, data):
    tok, strategy = tokenizers_for_streaming[name]
    ids = data.draw(strategy)
    for skip in (False, True):
        chunks, rest = _stream(tok, ids, skip)
        full = tok.decode(ids, skip)
        assert "".join(chunks) + rest == full
        # every chunk is final: it never holds a replacement character the full text would not have
        assert full.startswith("".join(chunks))


@pytest.mark.parametrize("name", ["phi3-rebuilt", "phi3-checkpoint", "phi3-gguf", "smollm2"])
def test_stream_decoder_on_text(tokenizers_for_streaming, name):
    tok = tokenizers_for_streaming[name][0]
    for text in TEXTS + [STREAM_TEXT]:
        ids = tok.encode(text)
        for skip in (False, True):
            chunks, rest = _stream(tok, ids, skip)
            assert "".join(chunks) + rest == tok.decode(ids, skip)
            assert "\ufffd" not in "".join(chunks)
    # plain text flows token by token, not at the end
    ids = tok.encode("Hello there, general Kenobi. How are you today?", False)
    chunks, rest = _stream(tok, ids, False)
    assert chunks == [tok.decode(ids[:n + 1])[len(tok.decode(ids[:n])):] for n in range(len(ids))] and rest == ""


# ---------------------------------------------------------------- one token's bytes


def _joined_bytes(tok, ids) -> bytes:
    """The tokens' own bytes where each stands (the first one that is not special at the start), joined."""
    out, first = [], True
    for i in ids:
        data = tok.token_bytes(i, first)
        assert (data is None) == tok.is_special(i)
        if data is not None:
            out.append(data)
            first = False
    return b"".join(out)


@pytest.mark.parametrize("name", ["phi3-rebuilt", "phi3-checkpoint", "phi3-gguf", "smollm2"])
def test_token_bytes_spell_the_text(tokenizers_for_streaming, name):
    """Joined, the tokens' bytes are the text's UTF-8: a byte token gives its raw byte (emoji and CJK
    are split into them on Phi-3), a SentencePiece word its leading space except at the very start."""
    tok = tokenizers_for_streaming[name][0]
    split = 0
    for text in TEXTS + [STREAM_TEXT]:
        ids = tok.encode(text, False)
        assert _joined_bytes(tok, ids) == tok.decode(ids, skip_special_tokens=True).encode(), text
        split += sum(1 for i in ids if tok.token_bytes(i) is not None and len(tok.token_bytes(i)) == 1
                     and tok.token_bytes(i)[0] >= 0x80)
    assert split > 0  # some token held a single non-ASCII byte: the raw-byte path was taken


@pytest.mark.parametrize("name", ["phi3-rebuilt", "phi3-checkpoint", "phi3-gguf", "smollm2"])
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_token_bytes_of_any_ids(tokenizers_for_streaming, name, data):
    """Any ids whose text is valid UTF-8 (no U+FFFD in the full decode): joined bytes are that text."""
    tok, strategy = tokenizers_for_streaming[name]
    ids = data.draw(strategy)
    text = tok.decode(ids, skip_special_tokens=True)
    if "\ufffd" not in text:
        assert _joined_bytes(tok, ids) == text.encode()
