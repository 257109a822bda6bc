"""Structured output and tool calls through `phi3 serve`'s API, driven by the official `openai` client.

The tiny random Phi-3 (real vocabulary and chat template) writes garbage when free, so a valid
answer is the grammar's doing; SmolLM2 (a real model) shows a meaningful one. Every JSON output is
checked with `jsonschema`.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pydantic
import pytest

import phi3
from phi3 import assets
from phi3.server import create_app
from conftest import write_checkpoint
from test_server import Server
from vocab_fixture import write_phi3_tokenizer_dir

NAME = "tiny-phi3"
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}},
                                       "required": ["zone"], "additionalProperties": False}}}
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}


class Pet(pydantic.BaseModel):
    kind: str = pydantic.Field(max_length=8)
    legs: int = pydantic.Field(ge=0, le=8)
    mood: str = pydantic.Field(pattern="^(happy|sad)$")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Phi-3 with the real Phi-3 vocabulary and chat template, and room for tool prompts."""
    folder = tmp_path_factory.mktemp("tools-model")
    write_checkpoint(folder, "longrope", seed=11, vocab_size=32064, eos_token_id=32000, pad_token_id=32000,
                     max_position_embeddings=1024)
    write_phi3_tokenizer_dir(folder)
    return folder


@pytest.fixture(scope="module")
def server(model_dir):
    s = Server(create_app(phi3.load(model_dir, device="cpu", dtype="float32"), name=NAME, max_batch=4)).wait_ready()
    yield s
    s.close()


def _calls_valid(calls) -> None:
    for call in calls:
        assert call.type == "function" and call.id
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])


def test_parse_with_a_pydantic_model(server):
    client = server.client()
    for seed in range(2):
        done = client.chat.completions.parse(model=NAME, messages=ASK, response_format=Pet, max_tokens=80, seed=seed)
        pet = done.choices[0].message.parsed
        assert isinstance(pet, Pet) and done.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(done.choices[0].message.content), Pet.model_json_schema())


def test_response_format_json_schema_and_vllm_extensions(server):
    client = server.client()
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9},
                                               "ok": {"type": "boolean"}, "xs": {"type": "array", "maxItems": 2,
                                                                                 "items": {"enum": ["a", "b"]}}},
              "required": ["n", "ok", "xs"], "additionalProperties": False}
    out = client.chat.completions.create(model=NAME, messages=ASK, max_tokens=60, temperature=0, response_format={
        "type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(out.choices[0].message.content), schema)
    def valid(text):
        jsonschema.validate(json.loads(text), schema)
        return True

    for body, check in [({"guided_json": schema}, valid),
                        ({"guided_regex": r"[0-9]{3}-[a-z]{2}"}, lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2}", t)),
                        ({"guided_choice": ["left", "right"]}, lambda t: t in ("left", "right")),
                        ({"guided_grammar": 'root ::= "A" [0-9] [0-9]'}, lambda t: re.fullmatch(r"A[0-9]{2}", t)),
                        ({"structured_outputs": {"regex": r"x{2,3}y"}}, lambda t: re.fullmatch(r"x{2,3}y", t)),
                        ({"structured_outputs": {"choice": ["up", "down"]}}, lambda t: t in ("up", "down"))]:
        chat = client.chat.completions.create(model=NAME, messages=ASK, max_tokens=60, seed=1, extra_body=body)
        assert check(chat.choices[0].message.content), (body, chat.choices[0].message.content)
        text = client.completions.create(model=NAME, prompt="Answer:", max_tokens=60, seed=2, extra_body=body)
        assert check(text.choices[0].text), (body, text.choices[0].text)
    streamed = client.chat.completions.create(model=NAME, messages=ASK, max_tokens=60, temperature=0, stream=True,
                                              extra_body={"guided_json": schema})
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in streamed if c.choices)), schema)


def test_required_and_named_tool_calls(server):
    client = server.client()
    for choice, parallel in [("required", True), ("required", False),
                             ({"type": "function", "function": {"name": "get_time"}}, True)]:
        out = client.chat.completions.create(model=NAME, messages=ASK, tools=[WEATHER, TIME], tool_choice=choice,
                                             parallel_tool_calls=parallel, max_tokens=120, temperature=0.8, seed=3)
        message = out.choices[0].message
        assert out.choices[0].finish_reason == "tool_calls" and message.tool_calls and message.content is None
        _calls_valid(message.tool_calls)
        if not parallel or isinstance(choice, dict):
            assert len(message.tool_calls) == 1
        if isinstance(choice, dict):
            assert message.tool_calls[0].function.name == "get_time"


def test_streamed_tool_calls_equal_the_whole_answer(server):
    client = server.client()
    kwargs = dict(model=NAME, messages=ASK, tools=[WEATHER, TIME], tool_choice="required", max_tokens=120,
                  temperature=0.8, seed=5)
    whole = client.chat.completions.create(**kwargs).choices[0]
    calls, finish = {}, None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for delta in chunk.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(delta.index, {"name": "", "arguments": ""})
            entry["name"] += (delta.function.name or "") if delta.function else ""
            entry["arguments"] += (delta.function.arguments or "") if delta.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == \
        [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]


def test_a_two_step_tool_conversation(server, model_dir):
    client = server.client()
    first = client.chat.completions.create(model=NAME, messages=ASK, tools=[WEATHER], tool_choice="required",
                                           max_tokens=80, seed=7)
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    second = client.chat.completions.create(model=NAME, messages=history, tools=[WEATHER], max_tokens=8, seed=7,
                                            temperature=0)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # the prompt the template rendered carries the call and the result
    tok = phi3.load(model_dir, device="cpu", dtype="float32").tokenizer
    text = tok.apply_chat_template(history, tools=[WEATHER])
    assert '<tool_response>\n{"temperature": 21}\n</tool_response>' in text
    assert f'"name": "get_weather", "arguments": {call.function.arguments}' in text
    assert '"name": "get_weather"' in text.split("<|user|>")[0]  # the tools, in the system turn
    none = client.chat.completions.create(model=NAME, messages=history, tools=[WEATHER], tool_choice="none",
                                          max_tokens=8, seed=7, temperature=0)
    assert none.choices[0].message.tool_calls is None


@pytest.mark.parametrize("body,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "intger"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "if": {"type": "string"}, "then": {"maxLength": 2}}}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"guided_regex": "a(b"}, "guided_regex"),
    ({"guided_grammar": "root ::= (("}, "guided_grammar"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ({"structured_outputs": {"xml": "x"}}, "structured_outputs.xml"),
    ({"tools": [{"type": "function", "function": {"parameters": {}}}]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"messages": [{"role": "tool", "tool_call_id": "x"}]}, "messages[0]"),
])
def test_bad_requests_are_400s_naming_the_parameter(server, body, param):
    r = server.post("/v1/chat/completions", {"model": NAME, "messages": ASK, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


# -- a real model --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    s = Server(create_app(phi3.load(assets.fetch(assets.SMOLLM2_GGUF)), name="smollm2", max_batch=2)).wait_ready()
    yield s
    s.close()


class Capital(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    city: str = pydantic.Field(max_length=40)
    country: str = pydantic.Field(max_length=40)
    founded_year: int = pydantic.Field(ge=-1000, le=2100)


def test_smollm2_answers_in_the_schema(smollm2):
    client = smollm2.client()
    done = client.chat.completions.parse(model="smollm2", response_format=Capital, temperature=0, max_tokens=60,
                                         messages=[{"role": "user", "content": "What is the capital of France?"}])
    capital = done.choices[0].message.parsed
    assert capital.city == "Paris" and done.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(done.choices[0].message.content), Capital.model_json_schema())
    obj = client.chat.completions.create(model="smollm2", temperature=0, max_tokens=80,
                                         response_format={"type": "json_object"},
                                         messages=[{"role": "user", "content": "Give the capital of Italy as JSON."}])
    assert isinstance(json.loads(obj.choices[0].message.content), dict)


def test_smollm2_tool_call_arguments(smollm2):
    client = smollm2.client()
    out = client.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER], tool_choice="required",
                                         parallel_tool_calls=False, temperature=0, max_tokens=60)
    assert out.choices[0].finish_reason == "tool_calls"
    [call] = out.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] == "Paris"
    jsonschema.validate(json.loads(call.function.arguments), PARAMS["get_weather"])
    # "auto": asked for a poem, the model answers in text (the grammar lets text through)
    poem = client.chat.completions.create(model="smollm2", tools=[WEATHER], temperature=0, max_tokens=40, messages=[
        {"role": "user", "content": "Write a haiku about the sea."}])
    assert poem.choices[0].message.tool_calls is None and len(poem.choices[0].message.content) > 20


def test_auto_lets_the_answer_be_text_or_calls(smollm2):
    """The "auto" grammar, fed token by token: a valid call and plain text are accepted; text that
    begins like a call must be one (its arguments validated)."""
    from phi3.grammar import matcher_for
    from phi3.sampling import SamplingParams
    from phi3.tools import call_grammar

    llm = phi3.load(assets.fetch(assets.SMOLLM2_GGUF))
    params = SamplingParams(grammar=call_grammar([WEATHER, TIME], "auto", True))

    def accepted(text: str) -> bool:
        m = matcher_for(params, llm.tokenizer, llm.config.vocab_size, llm.stop_ids)
        ids = llm.tokenizer.encode(text, add_special_tokens=False)
        for i in ids:
            m.advance(i)
        return m.error is None and m.is_accepting()

    call = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
    assert accepted(call) and accepted(call + "\n" + call)
    assert accepted("Sunny, 21 degrees.") and accepted("<b>bold</b> text")
    assert not accepted('<tool_call>\n{"name": "get_time", "arguments": {"zone": "cet"}}\n</tool_call>')
    assert not accepted('<tool_call>\nhello')
