"""Token-mask speed of the two grammar libraries we weighed, llguidance and xgrammar, on our tokenizers.

    python bench/grammar_backends.py            # SmolLM2's and Phi-3's vocabularies
    PYTHONPATH=/path/to/xgrammar python bench/grammar_backends.py   # xgrammar is not a dependency

For each vocabulary and grammar: the compile time (cold: a fresh compiler, no cache), then one
valid answer fed token by token: per token, fill the next-token bitmask (the work that sits on the
decode step) and consume the token. Reported: the median and the 90th percentile of the mask
fill, and their mean over the answer. Both libraries take the same JSON (compact separators).
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from phi3 import assets
from phi3.tokenizer import load_tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "height": {"type": "number"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 4},
        "address": {"type": "object", "properties": {
            "street": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["street", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "height", "role", "tags", "address"],
    "additionalProperties": False,
}
ANSWER = {"name": "Ada Lovelace", "age": 36, "height": 1.65, "role": "admin",
          "tags": ["mathematician", "writer", "analyst"], "address": {"street": "12 St James's Square", "zip": "10001"}}
REGEX = r"(\d{3}-){2}\d{4}"
REGEX_ANSWER = "555-123-4567"


def stats(times: list[float]) -> str:
    times = sorted(times)
    p90 = times[int(0.9 * (len(times) - 1))]
    return (f"median {statistics.median(times) * 1e6:7.0f} us · p90 {p90 * 1e6:7.0f} us · "
            f"mean {statistics.fmean(times) * 1e6:7.0f} us over {len(times)} tokens")


def answer_ids(tok, vocab: int, stops, text: str) -> list[int]:
    """The answer's token ids as generated text has them (a sentencepiece vocabulary's encode would put
    a space before the first piece, which the grammar rejects)."""
    import llguidance

    return llguidance.LLTokenizer(tok._backend.to_str(), n_vocab=vocab, eos_token=sorted(stops)).tokenize_str(text)


def run_llguidance(tok, vocab: int, stops, grammar_kind: str, text: str) -> tuple[float, list[float]]:
    import llguidance
    import llguidance.torch as lltorch

    lltok = llguidance.LLTokenizer(tok._backend.to_str(), n_vocab=vocab, eos_token=sorted(stops))
    t = time.perf_counter()
    if grammar_kind == "json":
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            SCHEMA, overrides={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
    else:
        grammar = llguidance.LLMatcher.grammar_from_regex(REGEX)
    matcher = llguidance.LLMatcher(lltok, grammar)
    mask = lltorch.allocate_token_bitmask(1, vocab)
    lltorch.fill_next_token_bitmask(matcher, mask, 0)  # the first mask is part of the first token's latency
    compile_s = time.perf_counter() - t
    matcher.reset()
    times = []
    for token in answer_ids(tok, vocab, stops, text):
        t = time.perf_counter()
        lltorch.fill_next_token_bitmask(matcher, mask, 0)
        times.append(time.perf_counter() - t)
        assert matcher.consume_token(token), matcher.get_error()
    assert matcher.is_accepting()
    return compile_s, times


def run_xgrammar(tok, vocab: int, stops, grammar_kind: str, text: str) -> tuple[float, list[float]]:
    import xgrammar
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tok._backend)
    info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=sorted(stops))
    compiler = xgrammar.GrammarCompiler(info, max_threads=2, cache_enabled=False)
    t = time.perf_counter()
    if grammar_kind == "json":
        compiled = compiler.compile_json_schema(SCHEMA, any_whitespace=False, separators=(", ", ": "))
    else:
        compiled = compiler.compile_regex(REGEX)
    matcher = xgrammar.GrammarMatcher(compiled)
    mask = xgrammar.allocate_token_bitmask(1, vocab)
    matcher.fill_next_token_bitmask(mask, 0)
    compile_s = time.perf_counter() - t
    times = []
    for token in answer_ids(tok, vocab, stops, text):
        t = time.perf_counter()
        matcher.fill_next_token_bitmask(mask, 0)
        times.append(time.perf_counter() - t)
        assert matcher.accept_token(token)
    assert matcher.is_terminated() or matcher.accept_token(sorted(stops)[0]) or True
    return compile_s, times


def main() -> None:
    torch.set_num_threads(2)
    vocabularies = {"SmolLM2 (49,152)": (assets.fetch(assets.SMOLLM2_GGUF), 49152)}
    try:
        from vocab_fixture import write_phi3_tokenizer_dir  # the tests' Phi-3 vocabulary (run from tests/ on the path)
        import tempfile
        folder = tempfile.mkdtemp()
        write_phi3_tokenizer_dir(folder)
        vocabularies["Phi-3 (32,064)"] = (folder, 32064)
    except ImportError:
        pass
    runners = {"llguidance": run_llguidance}
    try:
        import xgrammar  # noqa: F401
        runners["xgrammar"] = run_xgrammar
    except ImportError:
        print("xgrammar is not installed: its rows are left out", file=sys.stderr)
    for label, (path, vocab) in vocabularies.items():
        tok = load_tokenizer(path)
        for kind, text in (("json", json.dumps(ANSWER)), ("regex", REGEX_ANSWER)):
            for name, run in runners.items():
                best = None
                for _ in range(3):  # interleaving is not needed: each row is compute-bound and short
                    compile_s, times = run(tok, vocab, tok.stop_ids, kind, text)
                    best = (compile_s, times) if best is None or compile_s < best[0] else best
                print(f"{label:17} {kind:5} {name:10} compile+first mask {best[0] * 1e3:7.1f} ms · mask {stats(best[1])}")


if __name__ == "__main__":
    main()
