"""Structured output in the library: `json_schema`, `regex`, `choice` and `grammar` on LLM.generate.

The model is a tiny random Phi-3 with the real Phi-3 vocabulary: left alone it writes garbage, so
every valid answer here is the grammar's doing. Outputs are checked with `jsonschema` and `re`; the
reference for the tokens is transformers' greedy step restricted to the tokens llguidance allows.
"""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pydantic
import pytest
import torch

import phi3
from conftest import randomize, tiny_config
from phi3 import SamplingParams
from phi3.grammar import JSON_OPTIONS
from vocab_fixture import write_phi3_tokenizer_dir

PROMPT = [{"role": "user", "content": "Describe a person as JSON."}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 1, "maxItems": 3},
        "address": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                                                     "city": {"enum": ["Paris", "Rome"]}},
                    "required": ["zip", "city"], "additionalProperties": False},
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}
BUDGET = 200  # tokens: enough for PERSON with bounded strings
# No unbounded number here: a random model would write digits until its budget ran out (numbers are
# tested on SmolLM2, in test_server_grammar.py).


class Pet(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")  # additionalProperties: false, else any key may follow
    kind: str = pydantic.Field(max_length=8)
    legs: int = pydantic.Field(ge=0, le=8)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import Phi3Config, Phi3ForCausalLM

    folder = tmp_path_factory.mktemp("grammar-model")
    cfg = {**tiny_config("longrope"), "vocab_size": 32064, "eos_token_id": 32000, "pad_token_id": 32000}
    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config(**cfg)).eval()
    randomize(model, seed=7)
    model.save_pretrained(folder)
    write_phi3_tokenizer_dir(folder)
    return folder, model


@pytest.fixture(scope="module")
def llm(model_dir):
    return phi3.load(model_dir[0], device="cpu", dtype="float32")


def _valid(text: str, schema: dict) -> dict:
    value = json.loads(text)
    jsonschema.validate(value, schema)
    return value


def test_json_schema_output_validates(llm):
    for seed in range(3):
        out = llm.generate(PROMPT, json_schema=PERSON, max_new_tokens=BUDGET, temperature=1.0, seed=seed)
        assert out.finish_reason == "stop", out
        _valid(out.text, PERSON)
    greedy = llm.generate(PROMPT, json_schema=json.dumps(PERSON), max_new_tokens=BUDGET)  # a schema as JSON text
    _valid(greedy.text, PERSON)
    free = llm.generate(PROMPT, max_new_tokens=30)
    with pytest.raises(ValueError):
        json.loads(free.text)  # without the grammar the tiny model writes no JSON


def test_pydantic_model_class(llm):
    out = llm.generate(PROMPT, json_schema=Pet, max_new_tokens=60, temperature=0.8, seed=1)
    pet = Pet.model_validate_json(out.text)
    _valid(out.text, Pet.model_json_schema())
    assert out.finish_reason == "stop" and 0 <= pet.legs <= 8


def test_regex_choice_and_grammar(llm):
    for seed in range(3):
        # [0-9], not \d: llguidance's \d takes Unicode's newer digits (U+1CCF0..), which Python's re may not know
        phone = llm.generate(PROMPT, regex=r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}", max_new_tokens=30, temperature=1.0, seed=seed)
        assert re.fullmatch(r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}", phone.text) and phone.finish_reason == "stop", phone
        pick = llm.generate(PROMPT, choice=["yes", "no", "maybe not"], max_new_tokens=10, temperature=1.0, seed=seed)
        assert pick.text in ("yes", "no", "maybe not") and pick.finish_reason == "stop"
    gbnf = 'root ::= "The answer is " num "."\nnum ::= [1-9] [0-9]?'
    out = llm.generate(PROMPT, grammar=gbnf, max_new_tokens=20)
    assert re.fullmatch(r"The answer is [1-9][0-9]?\.", out.text), out
    lark = 'start: "x=" /[a-c]{2,4}/ ";"'
    assert re.fullmatch(r"x=[a-c]{2,4};", llm.generate(PROMPT, grammar=lark, max_new_tokens=20).text)


def test_greedy_tokens_are_transformers_greedy_over_the_allowed_tokens(llm, model_dir):
    """The reference: transformers' logits, every token llguidance's own matcher bans at -inf (the
    stop id only where the grammar may end), argmax; until the grammar is complete."""
    import llguidance

    folder, ref = model_dir
    lltok = llguidance.LLTokenizer((folder / "tokenizer.json").read_text(), n_vocab=32064,
                                   eos_token=sorted(llm.stop_ids))
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": -50, "maximum": 50}, "b": {"enum": ["x", "y"]}},
              "required": ["a", "b"], "additionalProperties": False}
    matcher = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS))
    ids = llm.encode_prompt(PROMPT)
    expected = []
    while not matcher.is_stopped() and len(expected) < 40:
        bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")[:32064]
        for s in llm.stop_ids:
            bits[s] = matcher.is_accepting()
        with torch.no_grad():
            logits = ref(torch.tensor([ids + expected])).logits[0, -1]
        token = int(logits.masked_fill(torch.from_numpy(bits == 0), float("-inf")).argmax())
        if token in llm.stop_ids:
            break
        expected.append(token)
        assert matcher.consume_token(token)
    out = llm.generate(PROMPT, json_schema=schema, max_new_tokens=40)
    assert out.token_ids == expected
    _valid(out.text, schema)


def test_batch_rows_equal_alone_and_streaming(llm):
    """Constrained and free rows side by side, greedy and seeded: each row's tokens are those it gets alone."""
    params = [SamplingParams(max_new_tokens=BUDGET, json_schema=PERSON),
              SamplingParams(max_new_tokens=12),
              SamplingParams(max_new_tokens=30, temperature=0.9, seed=3, regex=r"[a-z]{3,8}( [a-z]{3,8}){2}"),
              SamplingParams(max_new_tokens=12, temperature=0.9, seed=4),
              SamplingParams(max_new_tokens=10, choice=["red", "green", "blue"], temperature=1.0, seed=5)]
    batch = llm.generate([PROMPT] * len(params), params)
    for p, out in zip(params, batch):
        alone = llm.generate(PROMPT, p)
        assert out.token_ids == alone.token_ids and out.finish_reason == alone.finish_reason
        assert "".join(c.text for c in llm.stream(PROMPT, p)) == alone.text
    _valid(batch[0].text, PERSON)
    assert re.fullmatch(r"[a-z]{3,8}( [a-z]{3,8}){2}", batch[2].text)
    assert batch[4].text in ("red", "green", "blue")


def test_length_cuts_the_answer(llm):
    out = llm.generate(PROMPT, json_schema=PERSON, max_new_tokens=5)
    assert out.finish_reason == "length" and len(out.token_ids) == 5


def test_stop_ids_only_where_the_grammar_may_end(model_dir):
    """A stop id that the free model would write early is held back until the answer is complete."""
    llm = phi3.load(model_dir[0], device="cpu", dtype="float32")
    first = llm.generate(PROMPT, regex=r"[a-z]{2,30}", max_new_tokens=40).token_ids
    llm.stop_ids = llm.stop_ids | {first[0]}  # the first letter token is now a stop id too
    out = llm.generate(PROMPT, regex=r"[a-z]{2,30}", max_new_tokens=40)
    assert re.fullmatch(r"[a-z]{2,30}", out.text) and first[0] not in out.token_ids[:1]


def test_packed_weights_in_c(model_dir, ran_in_c):
    """int4 weights, the decode step's layers in C (csrc/layer.c): the mask still reaches the draw."""
    llm = phi3.load(model_dir[0], device="cpu", dtype="float32", quantize="int4")
    outs = llm.generate([PROMPT, PROMPT], [SamplingParams(max_new_tokens=BUDGET, json_schema=PERSON),
                                           SamplingParams(max_new_tokens=BUDGET, json_schema=Pet, temperature=1.0,
                                                          seed=2)])
    assert ran_in_c and all(ran_in_c)
    _valid(outs[0].text, PERSON)
    Pet.model_validate_json(outs[1].text)


def test_logprobs_are_the_models_own(llm):
    """With a grammar, the reported log-probabilities stay the model's (before the mask), as vLLM's."""
    engine = llm.engine_for([(8, SamplingParams())])
    ids = llm.encode_prompt(PROMPT)
    req = engine.submit(ids, SamplingParams(max_new_tokens=6, choice=["maybe", "no"], logprobs=2), llm.stop_ids)
    while not req.finished:
        engine.step()
    full = llm.logits(ids + req.tokens[:-1]).log_softmax(-1)[len(ids) - 1:]
    for k, (token, (lp, _)) in enumerate(zip(req.tokens, req.logprobs)):
        assert abs(full[k, token].item() - lp) < 1e-4


@pytest.mark.parametrize("kwargs,needle", [
    ({"json_schema": {"type": "object", "properties": {"a": {"type": "intger"}}}}, "json_schema"),
    ({"json_schema": "{not json"}, "json_schema"),
    ({"json_schema": [1, 2]}, "json_schema"),
    ({"json_schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}, "json_schema"),
    ({"regex": "a(b"}, "regex"),
    ({"grammar": "root ::= (("}, "grammar"),
    ({"choice": []}, "choice"),
    ({"choice": "yes"}, "choice"),
    ({"regex": "a", "choice": ["a"]}, "at most one"),
])
def test_bad_constraints_are_value_errors(llm, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        llm.generate(PROMPT, max_new_tokens=4, **kwargs)


def test_without_a_tokenizer(model_dir):
    llm = phi3.load(model_dir[0], device="cpu", dtype="float32")
    llm.tokenizer = None
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate([1, 2, 3], regex="a+", max_new_tokens=4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graphs_apply_the_mask_per_row(model_dir):
    """On CUDA the step (the mask included) is captured in a graph: constrained and free rows give the
    tokens of the eager step, and the constrained ones match their grammar."""
    from phi3.engine import Engine

    llm = phi3.load(model_dir[0], device="cuda", dtype="float32")
    ids = llm.encode_prompt(PROMPT)
    params = [SamplingParams(max_new_tokens=BUDGET, json_schema=PERSON), SamplingParams(max_new_tokens=20),
              SamplingParams(max_new_tokens=30, regex=r"[a-z]{3,8}( [a-z]{3,8}){2}", temperature=0.9, seed=3)]
    results = []
    for graphs in (True, False):
        engine = Engine(llm.model, slots=4, max_len=512, cuda_graphs=graphs, tokenizer=llm.tokenizer)
        reqs = [engine.submit(ids, p, llm.stop_ids) for p in params]
        while engine.busy:
            engine.step()
        results.append([r.tokens for r in reqs])
    assert results[0] == results[1]
    _valid(llm.tokenizer.decode(results[0][0], skip_special_tokens=True), PERSON)
    assert re.fullmatch(r"[a-z]{3,8}( [a-z]{3,8}){2}", llm.tokenizer.decode(results[0][2], skip_special_tokens=True))
