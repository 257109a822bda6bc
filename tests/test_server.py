"""The OpenAI-compatible server, driven over loopback by the official `openai` client and raw HTTP.

The model is a tiny random Phi-3 with the real vocabulary and chat template; the reference for
every answer is `LLM.generate` on its own copy of the same checkpoint. Servers run in a thread
(uvicorn on a free 127.0.0.1 port), or as `phi3 serve` in a subprocess for the signal tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn

import phi3
from conftest import write_checkpoint
from phi3 import SamplingParams
from phi3.server import MAX_BODY, create_app, serve
from vocab_fixture import write_phi3_tokenizer_dir

NAME = "tiny-phi3"
CONTEXT = 256  # the tiny model's max_position_embeddings (pre-training context 32: LongRoPE crossings too)
TIMEOUT = 60.0  # seconds: every wait in this file is bounded by it
CHAT = [{"role": "system", "content": "You are a helpful AI assistant."},
        {"role": "user", "content": "Can you provide ways to eat combinations of bananas and dragonfruits?"},
        {"role": "assistant", "content": "Sure! Try a smoothie: blend bananas and dragonfruits."},
        {"role": "user", "content": "What about solving an 2x + 3 = 7 equation?"}]
QUESTION = [{"role": "user", "content": "Tell me about the history of the Roman Empire."}]
STOPPING = [{"role": "user", "content": "Write a haiku about autumn leaves."}]  # ends on a stop id (see `stopper`)


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Phi-3 checkpoint with the real Phi-3 tokenizer files and generation config."""
    folder = tmp_path_factory.mktemp("server-model")
    write_checkpoint(folder, "longrope", seed=5, vocab_size=32064, eos_token_id=32000, pad_token_id=32000)
    write_phi3_tokenizer_dir(folder)  # after save_pretrained: the real generation_config.json
    return folder


def _load(model_dir, stop_ids=None):
    llm = phi3.load(model_dir, device="cpu", dtype="float32")
    if stop_ids is not None:
        llm.stop_ids = stop_ids
    return llm


@pytest.fixture(scope="module")
def stopper(model_dir):
    """A token id that the greedy answer to STOPPING reaches at its 6th token: added to the stop ids of
    both the server's model and the reference, so that a request can end on a stop id."""
    ids = _load(model_dir).generate(STOPPING, max_new_tokens=6).token_ids
    assert len(ids) == 6
    return ids[5]


@pytest.fixture(scope="module")
def ref(model_dir, stopper):
    """The reference: `LLM.generate` on its own copy of the model."""
    llm = _load(model_dir)
    llm.stop_ids = llm.stop_ids | {stopper}
    return llm


class Server:
    """`app` served by uvicorn in a thread on a free loopback port."""

    def __init__(self, app):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.app, self.url = app, f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        _until(lambda: self.server.started, "the server to start")

    def health(self) -> httpx.Response:
        return httpx.get(self.url + "/health", timeout=TIMEOUT)

    def wait_ready(self) -> Server:
        _until(lambda: self.health().status_code == 200, "the model to load")
        return self

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0,
                             timeout=TIMEOUT, **kw)

    def post(self, path: str, body, **kw) -> httpx.Response:
        content = json.dumps(body) if isinstance(body, dict) else body
        kw.setdefault("headers", {"Content-Type": "application/json"})
        return httpx.post(self.url + path, content=content, timeout=kw.pop("timeout", TIMEOUT), **kw)

    def close(self):
        self.server.should_exit = True
        self.thread.join(TIMEOUT)


def _until(condition, what: str, timeout: float = TIMEOUT):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout} s for {what}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def server(model_dir, ref):
    """The main server: 8 slots (so 64 clients also queue), the same stop ids as the reference."""
    s = Server(create_app(_load(model_dir, ref.stop_ids), name=NAME, max_batch=8)).wait_ready()
    yield s
    s.close()


@pytest.fixture
def make_server(model_dir, ref):
    """Servers of a test's own (for tests that watch slots and the queue), closed after it."""
    servers = []

    def make(**options) -> Server:
        servers.append(Server(create_app(_load(model_dir, ref.stop_ids), name=NAME, **options)))
        return servers[-1].wait_ready()

    yield make
    for s in servers:
        s.close()


def _events(response: httpx.Response) -> list:
    """An SSE body, checked for framing: `data: ` lines separated by blank lines; JSON parsed, [DONE] kept."""
    raw = b"".join(response.iter_bytes()).decode()
    assert raw.endswith("\n\n"), raw[-200:]
    events = raw[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), raw[:500]
    return [e[6:] if e == "data: [DONE]" else json.loads(e[6:]) for e in events]


def _params(max_tokens, temperature=0.0, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_tokens, temperature=temperature, **kw)


# -- start-up, models ------------------------------------------------------------------------------
def test_health_is_503_until_the_model_is_loaded(model_dir):
    loaded = threading.Event()

    def load():
        assert loaded.wait(TIMEOUT)
        return _load(model_dir)

    s = Server(create_app(load, name=NAME))
    try:
        r = s.health()
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = s.post("/v1/chat/completions", {"model": NAME, "messages": QUESTION})
        assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
        loaded.set()
        s.wait_ready()
        health = s.health().json()
        assert health | {"finished": {}, "kv_cache": {}} == {"status": "ok", "model": NAME, "slots": 8, "max_len": CONTEXT,
                                                             "running": 0, "waiting": 0, "finished": {}, "kv_cache": {}}
        assert health["kv_cache"]["blocks_used"] == 0 and health["kv_cache"]["prefix_cache"] is True
    finally:
        loaded.set()
        s.close()


def test_models_lists_the_served_name(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("microsoft/Phi-3-mini-4k-instruct")


# -- answers equal LLM.generate --------------------------------------------------------------------
CASES = [  # (messages, request options, the same as SamplingParams options)
    (CHAT, {"max_tokens": 24, "temperature": 0}, {}),
    (QUESTION, {"max_completion_tokens": 40, "temperature": 0.8, "top_p": 0.9, "seed": 7},
     {"temperature": 0.8, "top_p": 0.9, "seed": 7}),
    (QUESTION, {"max_tokens": 30, "temperature": 1.3, "seed": 3, "extra_body": {"top_k": 20, "min_p": 0.01}},
     {"temperature": 1.3, "seed": 3, "top_k": 20, "min_p": 0.01}),
    (CHAT[:2], {"max_tokens": 20, "seed": 5}, {"temperature": 1.0, "seed": 5}),  # OpenAI's default temperature: 1
]


@pytest.mark.parametrize("messages, options, same", CASES)
def test_chat_equals_generate(server, ref, messages, options, same):
    limit = options.get("max_tokens") or options["max_completion_tokens"]
    expected = ref.generate(messages, _params(limit, **{"temperature": 0.0, **same}))
    out = server.client().chat.completions.create(model=NAME, messages=messages, **options)
    assert out.object == "chat.completion" and out.model == NAME and len(out.choices) == 1
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == expected.text
    assert out.choices[0].finish_reason == expected.finish_reason
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (expected.usage.prompt_tokens,
                                                                       expected.usage.completion_tokens)


def test_int16_activations_serve_what_generate_gives(model_dir):
    """A packed model with the opt-in int16 activations, served: four chat requests at once (decoded
    in one batch) each get the text that `LLM.generate` gives the same request alone."""
    from concurrent.futures import ThreadPoolExecutor

    served, alone = (phi3.load(model_dir, dtype="float32", quantize="int4", activations="int16") for _ in range(2))
    s = Server(create_app(served, name=NAME, max_batch=4)).wait_ready()
    try:
        asks = [[{"role": "user", "content": f"Tell me about {topic}."}] for topic in ("Rome", "rivers", "tea", "snow")]
        with ThreadPoolExecutor(4) as pool:
            outs = list(pool.map(lambda m: s.client().chat.completions.create(model=NAME, messages=m, max_tokens=24,
                                                                             temperature=0), asks))
    finally:
        s.close()
    for messages, out in zip(asks, outs):
        assert out.choices[0].message.content == alone.generate(messages, _params(24)).text


@pytest.mark.parametrize("messages, options, same", CASES)
def test_chat_stream_equals_generate(server, ref, messages, options, same):
    limit = options.get("max_tokens") or options["max_completion_tokens"]
    expected = ref.generate(messages, _params(limit, **{"temperature": 0.0, **same}))
    chunks = list(server.client().chat.completions.create(model=NAME, messages=messages, stream=True,
                                                          stream_options={"include_usage": True}, **options))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == expected.text
    assert [c.choices[0].finish_reason for c in chunks[:-1] if c.choices[0].finish_reason] == [expected.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == expected.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == expected.usage.prompt_tokens


def test_openai_forms_map_onto_the_same_request(server, ref):
    """`developer` is the system role, content parts join into one text, `top_p: 0` keeps only the
    most likely token (greedy), a negative seed is taken modulo 2**63."""
    client = server.client()

    def answer(messages, **options):
        return client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, **options) \
            .choices[0].message.content

    parts = [{"role": "developer", "content": [{"type": "text", "text": "You are a helpful "},
                                               {"type": "text", "text": "AI assistant."}]}, CHAT[1]]
    assert answer(parts, temperature=0) == ref.generate(CHAT[:2], max_new_tokens=12).text
    assert answer(QUESTION, temperature=1.0, top_p=0, seed=1) == ref.generate(QUESTION, max_new_tokens=12).text
    assert answer(QUESTION, temperature=1.0, seed=-5) == \
        ref.generate(QUESTION, max_new_tokens=12, temperature=1.0, seed=2**63 - 5).text


def test_sse_framing(server, ref):
    """Raw bytes: event-stream type, `data:` events, one id, role first, one finish_reason, usage
    null until the usage chunk, then [DONE]; the text equals the non-streamed answer."""
    body = {"model": NAME, "messages": CHAT, "max_tokens": 20, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=TIMEOUT) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _events(r)
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert len({c["id"] for c in events[:-1]}) == 1 and {c["object"] for c in events[:-1]} == {"chat.completion.chunk"}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["usage"] is None for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks].count(None) == len(chunks) - 1
    assert chunks[-1]["choices"][0]["finish_reason"] is not None
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == sum(usage["usage"][k] for k in (
        "prompt_tokens", "completion_tokens"))
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == ref.generate(CHAT, max_new_tokens=20).text
    plain = server.post("/v1/chat/completions", {**body, "stream": False, "stream_options": None}).json()
    assert plain["choices"][0]["message"]["content"] == text


def test_a_stop_id_ends_with_finish_reason_stop(server, ref, stopper):
    out = server.client().chat.completions.create(model=NAME, messages=STOPPING, max_tokens=30, temperature=0)
    expected = ref.generate(STOPPING, max_new_tokens=30)
    assert out.choices[0].finish_reason == expected.finish_reason == "stop"
    assert out.usage.completion_tokens == len(expected.token_ids) <= 5 and stopper not in expected.token_ids
    assert out.choices[0].message.content == expected.text


def test_stop_strings(server, ref):
    full = ref.generate(QUESTION, max_new_tokens=40).text
    stop = full[len(full) // 2: len(full) // 2 + 3]  # cut mid-answer, likely inside a token
    expected = ref.generate(QUESTION, max_new_tokens=40, stop=[stop, "never-there"])
    assert expected.finish_reason == "stop" and expected.text == full[:full.find(stop)]
    client = server.client()
    out = client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=40, temperature=0,
                                         stop=[stop, "never-there"])
    assert (out.choices[0].message.content, out.choices[0].finish_reason) == (expected.text, "stop")
    chunks = list(client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=40, temperature=0,
                                                 stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_n_choices(server, ref):
    client = server.client()
    out = client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=16, n=3, temperature=1.0, seed=11)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert out.choices[0].message.content == ref.generate(QUESTION, max_new_tokens=16, temperature=1.0, seed=11).text
    assert len({c.message.content for c in out.choices}) == 3  # each choice draws with its own seed
    prompt_tokens = len(ref.encode_prompt(QUESTION))
    assert out.usage.prompt_tokens == prompt_tokens  # counted once, as OpenAI does
    stream = list(client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=16, n=3, temperature=1.0,
                                                 seed=11, stream=True))
    for k in range(3):
        mine = [c.choices[0] for c in stream if c.choices[0].index == k]
        assert mine[0].delta.role == "assistant"
        assert [c.finish_reason for c in mine if c.finish_reason] == [out.choices[k].finish_reason]
        assert "".join(c.delta.content or "" for c in mine) == out.choices[k].message.content


def test_length_limits(server, ref):
    client = server.client()
    out = client.chat.completions.create(model=NAME, messages=QUESTION, max_completion_tokens=5, temperature=0)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 5
    # no limit: the rest of the context, as OpenAI does
    out = client.chat.completions.create(model=NAME, messages=CHAT, temperature=0)
    expected = ref.generate(CHAT, max_new_tokens=CONTEXT - out.usage.prompt_tokens)
    assert out.choices[0].message.content == expected.text and out.choices[0].finish_reason == expected.finish_reason
    if expected.finish_reason == "length":
        assert out.usage.total_tokens == CONTEXT


def test_completions_endpoint(server, ref):
    client = server.client()
    text = "The history of the Roman Empire"
    ids = ref.encode_prompt("Once upon a time")
    out = client.completions.create(model=NAME, prompt=text, max_tokens=20, temperature=0)
    expected = ref.generate(text, max_new_tokens=20)
    assert out.object == "text_completion" and out.choices[0].text == expected.text
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (expected.usage.prompt_tokens,
                                                                       expected.usage.completion_tokens)
    assert client.completions.create(model=NAME, prompt=ids, max_tokens=12, temperature=0).choices[0].text == \
        ref.generate(ids, max_new_tokens=12).text
    both = client.completions.create(model=NAME, prompt=[text, "Once upon a time"], max_tokens=10, n=2,
                                     temperature=0.7, seed=2)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]  # prompt-major, as OpenAI orders them
    assert both.choices[0].text == ref.generate(text, max_new_tokens=10, temperature=0.7, seed=2).text
    assert both.choices[2].text == ref.generate("Once upon a time", max_new_tokens=10, temperature=0.7, seed=2).text
    chunks = list(client.completions.create(model=NAME, prompt=text, max_tokens=20, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == expected.finish_reason


# -- log-probabilities -----------------------------------------------------------------------------
def _model_logprobs(ref, prompt_ids: list[int], ids: list[int]) -> list[torch.Tensor]:
    """log_softmax of `LLM.logits` where each new token was drawn, each over the sequence up to there
    (one pass without a cache; its length picks the LongRoPE set, as the engine's did there)."""
    seq = list(prompt_ids) + list(ids)
    return [torch.log_softmax(ref.logits(seq[:len(prompt_ids) + i])[-1], -1) for i in range(len(ids))]


def _vocab_bytes(tok, token: int, first: bool) -> bytes | None:
    """The bytes a Phi-3 token writes, from its vocabulary spelling: None for special tokens, the byte of
    <0xNN>, else the piece with ▁ as a space (the decoder drops the text's first space)."""
    if tok.is_special(token):
        return None
    piece = tok.id_to_token(token)
    byte = re.fullmatch(r"<0x([0-9A-F]{2})>", piece)
    data = bytes([int(byte[1], 16)]) if byte else piece.replace("▁", " ").encode()
    return data[1:] if first and data[:1] == b" " else data


def _firsts(tok, ids: list[int]) -> list[bool]:
    """Which tokens stand at the start of the answer's text: those up to the first one that is not special."""
    out, first = [], True
    for token in ids:
        out.append(first)
        first = first and tok.is_special(token)
    return out


def _starts(tok, ids: list[int], text: str) -> list[int]:
    """Where each token's text begins in `text`: what the tokens before it decode to, as far as it agrees."""
    return [len(os.path.commonprefix([tok.decode(ids[:i], skip_special_tokens=True), text])) for i in range(len(ids))]


def _shown(tok, token: int, first: bool) -> str:
    data = _vocab_bytes(tok, token, first)
    return tok.id_to_token(token) if data is None else data.decode("utf-8", errors="backslashreplace")


def _check_chat_logprobs(ref, messages, expected, content: list[dict], top: int) -> int:
    """`content` (entries as dicts) against the model: each token's logprob is log_softmax of the logits,
    its alternatives the true top `top` in order, token/bytes as the vocabulary spells them. Returns
    how many alternatives were single non-ASCII bytes (shown as \\xNN)."""
    tok, ids = ref.tokenizer, expected.token_ids
    assert len(content) == len(ids)
    split = 0
    for entry, token, logp, first in zip(content, ids, _model_logprobs(ref, ref.encode_prompt(messages), ids),
                                         _firsts(tok, ids)):
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["logprob"] == pytest.approx(float(logp[token]), abs=1e-4)
        assert entry["token"] == _shown(tok, token, first)
        data = _vocab_bytes(tok, token, first)
        assert entry["bytes"] == (None if data is None else list(data))
        best = logp.topk(top)
        assert [a["logprob"] for a in entry["top_logprobs"]] == pytest.approx(best.values.tolist(), abs=1e-4)
        assert [a["token"] for a in entry["top_logprobs"]] == [_shown(tok, i, first) for i in best.indices.tolist()]
        for a, i in zip(entry["top_logprobs"], best.indices.tolist()):
            b = _vocab_bytes(tok, i, first)
            assert a["bytes"] == (None if b is None else list(b))
            split += b is not None and len(b) == 1 and b[0] >= 0x80 and a["token"] == f"\\x{b[0]:02x}"
    return split


def test_chat_logprobs_are_the_models(server, ref):
    """Greedy, with the official client: each token's logprob and its 5 alternatives are log_softmax of
    `LLM.logits` (values and order), the chosen token is the most likely, and the bytes, joined, are the
    answer's (a byte token gives its raw byte, not U+FFFD)."""
    expected = ref.generate(CHAT, max_new_tokens=24)
    out = server.client().chat.completions.create(model=NAME, messages=CHAT, max_tokens=24, temperature=0,
                                                  logprobs=True, top_logprobs=5)
    assert out.choices[0].message.content == expected.text
    content = [e.model_dump() for e in out.choices[0].logprobs.content]
    split = _check_chat_logprobs(ref, CHAT, expected, content, 5)
    assert split > 0  # a byte token among the alternatives, shown as its raw byte
    for e in content:  # greedy: the chosen token is the most likely one
        assert (e["token"], e["logprob"]) == (e["top_logprobs"][0]["token"], e["top_logprobs"][0]["logprob"])
    # joined, the bytes are the answer's; it holds a lone byte that is not UTF-8, which its text shows as U+FFFD
    joined = b"".join(bytes(e["bytes"]) for e in content if e["bytes"] is not None)
    assert "\ufffd" in expected.text and joined.decode(errors="replace") == expected.text


def test_sampled_logprobs_are_before_temperature(server, ref):
    """A sampled answer (temperature 1.3, seeded) reports the model's own distribution, not the tempered one;
    the prompt is shorter than the tiny model's pre-training context, so its answer crosses into LongRoPE's
    long factors on the way. No top_logprobs: empty lists."""
    expected = ref.generate(QUESTION, max_new_tokens=30, temperature=1.3, seed=4)
    assert len(ref.encode_prompt(QUESTION)) <= ref.config.original_max_position_embeddings < \
        len(ref.encode_prompt(QUESTION)) + len(expected.token_ids)
    out = server.client().chat.completions.create(model=NAME, messages=QUESTION, max_tokens=30, temperature=1.3,
                                                  seed=4, logprobs=True)
    assert out.choices[0].message.content == expected.text
    content = [e.model_dump() for e in out.choices[0].logprobs.content]
    _check_chat_logprobs(ref, QUESTION, expected, content, 0)
    logps = _model_logprobs(ref, ref.encode_prompt(QUESTION), expected.token_ids)
    assert any(int(lp.argmax()) != t for lp, t in zip(logps, expected.token_ids))  # some draws were not the top


def test_streamed_logprobs_equal_the_answers(server, ref):
    """Streamed chunks carry their tokens' entries; joined they are the non-streamed ones (n = 2, sampled)."""
    client = server.client()
    options = dict(model=NAME, messages=CHAT, max_tokens=20, temperature=1.0, seed=8, n=2, logprobs=True,
                   top_logprobs=3)
    out = client.chat.completions.create(**options)
    chunks = list(client.chat.completions.create(stream=True, **options))
    for k in range(2):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == k]
        assert mine[0].logprobs is None  # the role chunk
        streamed = [e.model_dump() for c in mine[1:] for e in c.logprobs.content]
        assert streamed == [e.model_dump() for e in out.choices[k].logprobs.content]
        assert "".join(c.delta.content or "" for c in mine) == out.choices[k].message.content
    assert ref.generate(CHAT, max_new_tokens=20, temperature=1.0, seed=8).text == out.choices[0].message.content


def test_logprobs_shapes_over_raw_http(server):
    body = {"model": NAME, "messages": QUESTION, "max_tokens": 6, "temperature": 0}
    plain = server.post("/v1/chat/completions", body).json()["choices"][0]
    assert plain["logprobs"] is None
    asked = server.post("/v1/chat/completions", {**body, "logprobs": True, "top_logprobs": 2}).json()["choices"][0]
    assert set(asked["logprobs"]) == {"content", "refusal"} and asked["logprobs"]["refusal"] is None
    entry = asked["logprobs"]["content"][0]
    assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"} and len(entry["top_logprobs"]) == 2
    assert set(entry["top_logprobs"][0]) == {"token", "logprob", "bytes"}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=TIMEOUT) as r:
        assert all(c["choices"][0]["logprobs"] is None for c in _events(r)[:-1])
    text = server.post("/v1/completions", {"model": NAME, "prompt": "Once upon a time", "max_tokens": 6,
                                           "temperature": 0}).json()["choices"][0]
    assert text["logprobs"] is None


def test_a_stop_string_keeps_the_tokens_that_begin_before_it(server, ref):
    """The stop string starts inside a token: that token is the last one reported (its text is in the
    answer in part), the tokens after it are not; streamed, the same entries."""
    full = ref.generate(CHAT, max_new_tokens=24)
    tok, ids = ref.tokenizer, full.token_ids
    starts = _starts(tok, ids, full.text)
    j = next(i for i in range(3, len(ids) - 1) if starts[i + 1] - starts[i] >= 4)
    stop = full.text[starts[j] + 2:starts[j + 1] + 3]  # from inside token j into the next one
    cut = full.text.find(stop)
    assert cut == starts[j] + 2  # it occurs there first
    kept = sum(1 for s in starts if s < cut)
    client = server.client()
    options = dict(model=NAME, messages=CHAT, max_tokens=24, temperature=0, stop=stop, logprobs=True, top_logprobs=1)
    out = client.chat.completions.create(**options)
    assert (out.choices[0].message.content, out.choices[0].finish_reason) == (full.text[:cut], "stop")
    content = [e.model_dump() for e in out.choices[0].logprobs.content]
    assert len(content) == kept == j + 1 < out.usage.completion_tokens  # the tokens after the cut: left out
    assert [e["token"] for e in content] == [_shown(tok, t, f) for t, f in zip(ids, _firsts(tok, ids))][:j + 1]
    chunks = list(client.chat.completions.create(stream=True, **options))
    assert [e.model_dump() for c in chunks[1:] for e in c.choices[0].logprobs.content] == content


def test_a_token_held_back_for_a_stop_string_waits_for_its_text(ref):
    """Stop "ab" after "Java", "a", "b": the text stream sends "Jav", then "a" (Java's) with the id of the
    second "a", whose own text is held back and then cut. Its entry goes with no chunk: an entry goes
    with the chunk its text begins in, and past the cut not at all."""
    from phi3.generate import TextStream
    from phi3.logprobs import AnswerLogprobs, TokenTexts

    tok = ref.tokenizer
    ids = [tok.token_to_id(t) for t in ("▁Java", "a", "b")]
    text, logprobs = TextStream(tok, ["ab"], 1), AnswerLogprobs(TokenTexts(tok))
    sent = []
    for token in ids:
        logprobs.push(token, (-1.0, []))
        chunk = text.push(token)
        sent.append((chunk.text, chunk.token_ids, [e.text for e in logprobs.entries(chunk)]))
    assert sent == [("Jav", ids[:1], ["Java"]), ("a", ids[1:2], []), ("", ids[2:], [])]
    assert text.done


def test_completions_logprobs(server, ref):
    """/v1/completions: tokens, token_logprobs, top_logprobs (the 3 most likely and the chosen one) and
    text_offset, each against the model; streamed, the same lists in pieces."""
    prompt, tok = "The history of the Roman Empire", ref.tokenizer

    def covers(seed):  # a byte that is not a character among the drawn tokens, and a draw outside the top 3
        done = ref.generate(prompt, max_new_tokens=16, temperature=0.9, seed=seed)
        first = _firsts(tok, done.token_ids)
        logps = _model_logprobs(ref, ref.encode_prompt(prompt), done.token_ids)
        return (any(_shown(tok, t, f).startswith("\\x") for t, f in zip(done.token_ids, first))
                and any(t not in logp.topk(3).indices.tolist() for t, logp in zip(done.token_ids, logps)))

    seed = next(seed for seed in range(64) if covers(seed))
    expected = ref.generate(prompt, max_new_tokens=16, temperature=0.9, seed=seed)
    body = {"model": NAME, "prompt": prompt, "max_tokens": 16, "temperature": 0.9, "seed": seed, "logprobs": 3}
    choice = server.post("/v1/completions", body).json()["choices"][0]
    assert choice["text"] == expected.text
    lp, ids = choice["logprobs"], expected.token_ids
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    first = _firsts(tok, ids)
    assert lp["tokens"] == [_shown(tok, t, f) for t, f in zip(ids, first)]
    assert any(t.startswith("\\x") for t in lp["tokens"])  # a byte that is not a character, shown as \xNN
    assert lp["text_offset"] == _starts(tok, ids, expected.text)
    for i, (token, logp) in enumerate(zip(ids, _model_logprobs(ref, ref.encode_prompt(prompt), ids))):
        assert lp["token_logprobs"][i] == pytest.approx(float(logp[token]), abs=1e-4)
        best = logp.topk(3)
        want = {_shown(tok, t, first[i]): v for t, v in zip(best.indices.tolist(), best.values.tolist())}
        want.setdefault(lp["tokens"][i], float(logp[token]))
        assert lp["top_logprobs"][i] == pytest.approx(want, abs=1e-4)
    assert any(len(d) == 4 for d in lp["top_logprobs"])  # a drawn token outside the top 3 is added
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=TIMEOUT) as r:
        pieces = [c["choices"][0]["logprobs"] for c in _events(r)[:-1]]
    assert {k: [x for p in pieces for x in p[k]] for k in lp} == lp


def test_rows_without_logprobs_are_unaffected(server, ref):
    """Requests with and without logprobs decoding together (greedy and sampled of each): every text
    is LLM.generate's; only the ones that asked get logprobs, and theirs are the model's."""
    requests = [(CHAT, {"temperature": 0, "logprobs": True, "top_logprobs": 2}, {}),
                (QUESTION, {"temperature": 0}, {}),
                (QUESTION, {"temperature": 1.0, "seed": 5}, {"temperature": 1.0, "seed": 5}),
                (CHAT[:2], {"temperature": 1.0, "seed": 9, "logprobs": True}, {"temperature": 1.0, "seed": 9})]

    async def main():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                                      timeout=TIMEOUT) as client:
            return await asyncio.gather(*(client.chat.completions.create(model=NAME, messages=m, max_tokens=30, **o)
                                          for m, o, _ in requests))

    for (messages, options, same), out in zip(requests, asyncio.run(main())):
        expected = ref.generate(messages, _params(30, **{"temperature": 0.0, **same}))
        assert out.choices[0].message.content == expected.text
        if options.get("logprobs"):
            content = [e.model_dump() for e in out.choices[0].logprobs.content]
            _check_chat_logprobs(ref, messages, expected, content, options.get("top_logprobs", 0))
        else:
            assert out.choices[0].logprobs is None


# -- errors ----------------------------------------------------------------------------------------
def _chat(**kw):
    return json.dumps({"model": NAME, "messages": QUESTION, "max_tokens": 4, **kw})


BAD = [  # (path, body, status, param, code)
    ("/v1/chat/completions", "{not json", 400, None, "invalid_json"),
    ("/v1/chat/completions", "[]", 400, None, "invalid_json"),
    ("/v1/chat/completions", "42", 400, None, "invalid_json"),
    ("/v1/chat/completions", "null", 400, None, "invalid_json"),
    ("/v1/chat/completions", b'{"model": "tiny-phi3", "messages": [{"role": "user", "content": "\xff"}]}', 400, None,
     "invalid_json"),
    ("/v1/chat/completions", '{"model": "tiny-phi3", "messages": [{"role": "user", "content": "\\ud800"}]}', 400,
     None, "invalid_json"),
    ("/v1/chat/completions", "{}", 400, "model", "missing_required_parameter"),
    ("/v1/chat/completions", json.dumps({"model": NAME}), 400, "messages", "missing_required_parameter"),
    ("/v1/chat/completions", _chat(messages=[]), 400, "messages", "invalid_value"),
    ("/v1/chat/completions", _chat(messages="hi"), 400, "messages", "invalid_type"),
    ("/v1/chat/completions", _chat(messages=[123]), 400, "messages[0]", "invalid_type"),
    ("/v1/chat/completions", _chat(messages=[{}]), 400, "messages[0].role", "missing_required_parameter"),
    ("/v1/chat/completions", _chat(messages=[{"role": 123, "content": "x"}]), 400, "messages[0].role", "invalid_value"),
    ("/v1/chat/completions", _chat(messages=[{"role": "user", "content": 123}]), 400, "messages[0].content",
     "invalid_type"),
    ("/v1/chat/completions", _chat(messages=[{"role": "robot", "content": "x"}]), 400, "messages[0].role",
     "invalid_value"),
    ("/v1/chat/completions", _chat(temperature=2.5), 400, "temperature", "invalid_value"),
    ("/v1/chat/completions", _chat(temperature=-0.1), 400, "temperature", "invalid_value"),
    ("/v1/chat/completions", _chat(temperature="hot"), 400, "temperature", "invalid_type"),
    ("/v1/chat/completions", _chat(top_p=1.5), 400, "top_p", "invalid_value"),
    ("/v1/chat/completions", _chat(n=0), 400, "n", "invalid_value"),
    ("/v1/chat/completions", _chat(n=1000), 400, "n", "invalid_value"),
    ("/v1/chat/completions", _chat(max_tokens=0), 400, "max_tokens", "invalid_value"),
    ("/v1/chat/completions", _chat(max_tokens=-1), 400, "max_tokens", "invalid_value"),
    ("/v1/chat/completions", _chat(max_tokens=True), 400, "max_tokens", "invalid_type"),
    ("/v1/chat/completions", _chat(max_tokens="5"), 400, "max_tokens", "invalid_type"),
    ("/v1/chat/completions", _chat(seed=2**64), 400, "seed", "invalid_value"),
    ("/v1/chat/completions", _chat(stop=17), 400, "stop", "invalid_type"),
    ("/v1/chat/completions", _chat(stop=[""]), 400, "stop", "invalid_value"),
    ("/v1/chat/completions", _chat(stop=[str(i) for i in range(17)]), 400, "stop", "invalid_value"),
    ("/v1/chat/completions", _chat(stream_options={"include_usage": True}), 400, "stream_options", None),
    ("/v1/chat/completions", _chat(top_logprobs=2), 400, "top_logprobs", "invalid_value"),  # needs logprobs: true
    ("/v1/chat/completions", _chat(logprobs=False, top_logprobs=0), 400, "top_logprobs", "invalid_value"),
    ("/v1/chat/completions", _chat(logprobs=True, top_logprobs=21), 400, "top_logprobs", "invalid_value"),
    ("/v1/chat/completions", _chat(logprobs=True, top_logprobs=-1), 400, "top_logprobs", "invalid_value"),
    ("/v1/chat/completions", _chat(logprobs="yes"), 400, "logprobs", "invalid_type"),
    ("/v1/chat/completions", _chat(logprobs=1), 400, "logprobs", "invalid_type"),
    ("/v1/completions", json.dumps({"model": NAME, "prompt": "x", "logprobs": 6}), 400, "logprobs", "invalid_value"),
    ("/v1/completions", json.dumps({"model": NAME, "prompt": "x", "logprobs": True}), 400, "logprobs", "invalid_type"),
    ("/v1/chat/completions", _chat(presence_penalty=0.5), 400, "presence_penalty", "unsupported_parameter"),
    ("/v1/chat/completions", _chat(tools=[{"type": "function"}]), 400, "tools", "invalid_value"),  # a tool without a function
    ("/v1/chat/completions", _chat(max_tokens=CONTEXT), 400, "max_tokens", "context_length_exceeded"),
    ("/v1/chat/completions", _chat(max_tokens=CONTEXT, stream=True), 400, "max_tokens", "context_length_exceeded"),
    ("/v1/chat/completions", _chat(model="gpt-4o"), 404, "model", "model_not_found"),
    ("/v1/chat/completions", _chat(model="../../etc/passwd"), 404, "model", "model_not_found"),
    ("/v1/completions", json.dumps({"model": NAME, "prompt": 42}), 400, "prompt", "invalid_type"),
    ("/v1/completions", json.dumps({"model": NAME, "prompt": ""}), 400, "prompt", None),
    ("/v1/completions", json.dumps({"model": NAME, "prompt": [1, -5]}), 400, "prompt", None),
    ("/v1/completions", json.dumps({"model": NAME, "prompt": [40000]}), 400, "prompt", None),
    ("/v1/completions", json.dumps({"model": NAME, "prompt": "x", "echo": True, "stream": True}), 400, "echo",
     "unsupported_parameter"),
    ("/v1/completions", json.dumps({"model": NAME, "prompt": "x", "max_tokens": 0}), 400, "max_tokens", "invalid_value"),
    ("/v1/completions", json.dumps({"model": NAME, "prompt": ["a", "b", "c"], "n": 128}), 400, "n", None),
    ("/v1/nothing-here", _chat(), 404, None, "not_found"),
]


def _check_envelope(r: httpx.Response, status: int, param=None, code=None):
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
    assert "Traceback" not in r.text and " at 0x" not in r.text
    assert (error["param"], error["code"]) == (param, code), error
    return error


@pytest.mark.parametrize("path, body, status, param, code", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_requests_get_openai_errors(server, path, body, status, param, code):
    _check_envelope(server.post(path, body), status, param, code)


def test_errors_leave_the_server_working(server):
    for path, body, *_ in BAD:
        server.post(path, body)
    r = server.post("/v1/chat/completions", _chat())
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")
    assert httpx.get(server.url + "/v1/chat/completions", timeout=TIMEOUT).status_code == 405


def test_context_length_boundary(server, ref):
    """prompt + max_tokens == context is served; one more token is refused, streamed or not."""
    ids = (ref.encode_prompt("The history of the Roman Empire ") * 100)[:CONTEXT - 1]
    r = server.post("/v1/completions", {"model": NAME, "prompt": ids, "max_tokens": 1, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"] == {"prompt_tokens": CONTEXT - 1, "completion_tokens": 1,
                                                          "total_tokens": CONTEXT}
    assert r.json()["choices"][0]["text"] == ref.generate(ids, max_new_tokens=1).text
    for body in ({"prompt": ids, "max_tokens": 2}, {"prompt": ids + [ids[0]]}, {"prompt": ids, "max_tokens": 2,
                                                                                 "stream": True}):
        error = _check_envelope(server.post("/v1/completions", {"model": NAME, **body}), 400,
                                "max_tokens" if "max_tokens" in body else "prompt", "context_length_exceeded")
        assert str(CONTEXT) in error["message"]


def test_oversized_body_is_413(server):
    big = json.dumps({"model": NAME, "messages": [{"role": "user", "content": "x" * (MAX_BODY + 1)}]})
    _check_envelope(server.post("/v1/chat/completions", big), 413, None, "request_too_large")

    def chunked():  # no Content-Length: counted while reading
        for _ in range(MAX_BODY // 2**16 + 2):
            yield b" " * 2**16

    _check_envelope(server.post("/v1/chat/completions", chunked()), 413, None, "request_too_large")


def test_api_key(model_dir):
    s = Server(create_app(_load(model_dir), name=NAME, api_key="sekrit")).wait_ready()
    try:
        assert s.health().status_code == 200  # public, for load balancers
        routes = [(m, r.path.replace("{model:path}", NAME)) for r in s.app.routes for m in getattr(r, "methods", ())
                  if r.path != "/health" and m != "HEAD"]
        assert len(routes) == 5  # /metrics, the models, the two completions
        for method, path in routes + [("GET", "/nothing-here")]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}):
                r = httpx.request(method, s.url + path, headers=headers, content=_chat(), timeout=TIMEOUT)
                _check_envelope(r, 401, None, "invalid_api_key")
        assert s.client(api_key="sekrit").chat.completions.create(model=NAME, messages=QUESTION, max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").models.list()
    finally:
        s.close()


def test_full_queue_is_429_with_retry_after(make_server, ref):
    small_server = make_server(max_batch=1, max_queue=1)
    body = {"model": NAME, "messages": QUESTION, "max_tokens": 200, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.Client(timeout=TIMEOUT) as a, httpx.Client(timeout=TIMEOUT) as b:
        with a.stream("POST", small_server.url + "/v1/chat/completions", json=body) as first, \
                b.stream("POST", small_server.url + "/v1/chat/completions", json=body) as second:
            assert first.status_code == second.status_code == 200  # one runs, one waits
            r = small_server.post("/v1/chat/completions", _chat())
            _check_envelope(r, 429, None, "queue_full")
            assert r.headers["retry-after"] == "1"
            with pytest.raises(openai.RateLimitError):
                small_server.client().chat.completions.create(model=NAME, messages=QUESTION, max_tokens=2)
    # both streams closed, the running one and the waiting one: both end, and the next request is served
    _until(lambda: small_server.health().json()["running"] == 0, "the slots to be freed")
    assert small_server.health().json()["finished"] == {"cancelled": 2}
    out = small_server.client().chat.completions.create(model=NAME, messages=QUESTION, max_tokens=8, temperature=0)
    assert out.choices[0].message.content == ref.generate(QUESTION, max_new_tokens=8).text


# -- faults ----------------------------------------------------------------------------------------
def test_a_client_that_disconnects_frees_its_slot(make_server, ref):
    small_server = make_server(max_batch=2)
    long = {"model": NAME, "messages": QUESTION, "max_tokens": 220, "temperature": 0, "ignore_eos": True}
    health = small_server.health
    with httpx.Client(timeout=TIMEOUT) as gone, httpx.Client(timeout=TIMEOUT) as stays:
        with stays.stream("POST", small_server.url + "/v1/chat/completions",
                          json={"model": NAME, "messages": CHAT, "max_tokens": 30, "temperature": 0,
                                "stream": True}) as other:
            with gone.stream("POST", small_server.url + "/v1/chat/completions", json={**long, "stream": True}) as r:
                lines = r.iter_lines()
                for _ in range(6):  # the role chunk and a few tokens
                    next(lines)
            # `gone` hung up mid-stream: its request is cancelled, the other one goes on untouched
            _until(lambda: health().json()["finished"].get("cancelled", 0) == 1, "the stream's request to end")
            text = "".join(c["choices"][0]["delta"].get("content", "") for c in _events(other)[:-1])
        assert text == ref.generate(CHAT, max_new_tokens=30).text
    _until(lambda: health().json()["running"] == 0, "the slots to be freed")
    # a non-streamed request whose client gives up is cancelled as well
    with pytest.raises(httpx.ReadTimeout):
        small_server.post("/v1/chat/completions", long, timeout=0.05)
    _until(lambda: health().json()["finished"].get("cancelled", 0) == 2, "the abandoned request to end")
    assert health().json()["finished"].get("length", 0) <= 2  # neither ran to its 220 tokens
    _until(lambda: health().json()["running"] == 0, "the slots to be freed")


def test_64_concurrent_streaming_clients(server, ref):
    """64 clients at once on 8 slots: continuous batching and the queue; every answer equals LLM.generate."""
    requests = []
    for i in range(64):
        messages = [{"role": "user", "content": f"Question {i}: what is {i} times {i + 3}?"}]
        # two sampled ones (a sampling row makes its whole batch pay for the draw: kept few, for time)
        options = {"max_tokens": 12, "temperature": 0.9, "top_p": 0.95, "seed": i} if i < 2 else \
            {"max_tokens": 8 + i % 17, "temperature": 0}
        requests.append((messages, options))
    params = [_params(o["max_tokens"], **{k: v for k, v in o.items() if k != "max_tokens"}) for _, o in requests]
    expected = [ref.generate(requests[i][0], params[i]) for i in range(2)] + \
        ref.generate([m for m, _ in requests[2:]], params[2:])

    async def one(client, messages, options):
        stream = await client.chat.completions.create(model=NAME, messages=messages, stream=True, **options)
        text, finish = [], []
        async for chunk in stream:
            text.append(chunk.choices[0].delta.content or "")
            finish += [chunk.choices[0].finish_reason] if chunk.choices[0].finish_reason else []
        return "".join(text), finish

    async def main():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                                      timeout=TIMEOUT) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, m, o) for m, o in requests)), 2 * TIMEOUT)

    results = asyncio.run(main())
    assert [r[0] for r in results] == [e.text for e in expected]
    assert [r[1] for r in results] == [[e.finish_reason] for e in expected]
    _until(lambda: server.health().json()["running"] == 0, "the slots to be freed")


def test_an_engine_failure_ends_requests_in_band_and_turns_health_503(model_dir):
    llm = _load(model_dir)
    forward, calls = llm.model.forward, []

    def failing(*args, **kw):  # the 5th forward (a decode step) raises
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("simulated device fault")
        return forward(*args, **kw)

    llm.model.forward = failing
    s = Server(create_app(llm, name=NAME)).wait_ready()
    try:
        body = {"model": NAME, "messages": QUESTION, "max_tokens": 20, "temperature": 0, "stream": True}
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=TIMEOUT) as r:
            events = _events(r)
        assert events[-1] == "[DONE]" and events[-2]["error"]["type"] == "server_error"
        assert "simulated" not in json.dumps(events[-2])  # the cause stays in the server's log
        assert s.health().status_code == 503 and s.health().json()["status"] == "failed"
        _check_envelope(s.post("/v1/chat/completions", _chat()), 503, None, "unavailable")
    finally:
        s.close()


def test_a_cache_that_cannot_fit_fails_start_up(model_dir, capfd):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    code = serve(_load(model_dir), port=port, max_len=CONTEXT * 4, log_level="error")
    assert code == 2 and "max_len must be an integer in [2, 256]" in capfd.readouterr().err


def test_cli_rejects_bad_options_before_loading(capsys):
    from phi3.cli import main

    assert main(["serve", "--model", "no-such-model", "--max-batch", "0"]) == 2
    assert "max_batch must be an integer >= 1, got 0" in capsys.readouterr().err


# -- phi3 serve, SIGTERM ---------------------------------------------------------------------------
def _start_cli(model_dir, *args) -> tuple[subprocess.Popen, str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "phi3", "serve", "--model", str(model_dir), "--port", str(port),
                             "--served-model-name", NAME, "--dtype", "float32", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def ready():
        assert proc.poll() is None, proc.stdout.read().decode()
        try:
            return httpx.get(url + "/health", timeout=TIMEOUT).status_code == 200
        except httpx.TransportError:
            return False

    _until(ready, "phi3 serve to load")
    return proc, url


def _streams_through_sigterm(proc, url, count: int, max_tokens: int) -> list[list]:
    """`count` streams; SIGTERM once each has its first token; the events each one got."""
    body = {"model": NAME, "messages": QUESTION, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    started, results = threading.Barrier(count + 1, timeout=TIMEOUT), [None] * count

    def client(k):
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=TIMEOUT) as r:
            lines = r.iter_lines()
            first = [next(lines), next(lines), next(lines), next(lines)]  # role chunk, blank, a token, blank
            started.wait()
            rest = "\n".join(lines)
        results[k] = [json.loads(e[6:]) if e != "data: [DONE]" else "[DONE]"
                      for e in ("\n".join(first) + "\n" + rest).strip().split("\n\n")]

    threads = [threading.Thread(target=client, args=(k,)) for k in range(count)]
    for t in threads:
        t.start()
    started.wait()
    proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(TIMEOUT)
    return results


def test_sigterm_drains_requests_in_flight_and_exits_0(model_dir):
    proc, url = _start_cli(model_dir, "--max-batch", "4")
    try:
        results = _streams_through_sigterm(proc, url, 3, 100)
        assert proc.wait(TIMEOUT) == 0
    finally:
        proc.kill()
    expected = _load(model_dir, stop_ids=[]).generate(QUESTION, max_new_tokens=100).text
    for events in results:
        assert events[-1] == "[DONE]"
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == expected
        assert events[-2]["choices"][0]["finish_reason"] == "length"
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=TIMEOUT)


def test_sigterm_past_the_drain_timeout_ends_streams_in_band(model_dir):
    proc, url = _start_cli(model_dir, "--max-batch", "4", "--drain-timeout", "0")
    try:
        results = _streams_through_sigterm(proc, url, 2, 220)
        assert proc.wait(TIMEOUT) == 0
    finally:
        proc.kill()
    for events in results:
        assert events[-1] == "[DONE]" and events[-2]["error"]["message"] == "the server is shutting down"


# -- the paged KV cache under the server ------------------------------------------------------------
def test_streams_under_pool_pressure_equal_the_library(make_server, ref):
    """A KV pool far too small for every stream at once: rows are preempted and resumed, and every
    stream still carries exactly the library's greedy text, in order, nothing dropped or repeated;
    a follow-up turn reuses the first turn's keys (/health and /metrics count the hit tokens)."""
    s = make_server(max_batch=8, kv_cache_tokens=12 * 16)
    prompts = [[{"role": "user", "content": f"Question {k}: tell me everything you know about the number {k * 7}, its "
                                            "history, its uses in science and the stories told about it."}]
               for k in range(8)]  # over two blocks of prompt: the next turn reuses them
    expected = [ref.generate(p, max_new_tokens=48).text for p in prompts]
    client, results = s.client(), [None] * len(prompts)

    def ask(k):
        parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=NAME, messages=prompts[k], max_tokens=48, temperature=0, stream=True) if c.choices]
        results[k] = "".join(parts)

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert results == expected
    metrics = httpx.get(s.url + "/metrics", timeout=TIMEOUT).text
    preempted = float(re.search(r"^phi3:num_preemptions_total (\S+)$", metrics, re.M).group(1))
    assert preempted > 0, metrics
    # the first turn again, alone (under pressure its blocks were evicted), then the next turn
    assert client.chat.completions.create(model=NAME, messages=prompts[0], max_tokens=48,
                                          temperature=0).choices[0].message.content == expected[0]
    turn2 = prompts[0] + [{"role": "assistant", "content": expected[0]}, {"role": "user", "content": "And then?"}]
    before = s.health().json()["kv_cache"]["prefix_hit_tokens"]
    answer = client.chat.completions.create(model=NAME, messages=turn2, max_tokens=16, temperature=0)
    assert answer.choices[0].message.content == ref.generate(turn2, max_new_tokens=16).text
    assert s.health().json()["kv_cache"]["prefix_hit_tokens"] - before >= 32
    assert re.search(r'^phi3:kv_cache_blocks\{state="used"\} 0$', httpx.get(s.url + "/metrics").text, re.M)


def test_a_prompt_longer_than_the_pool_is_a_400(make_server):
    s = make_server(max_batch=2, kv_cache_tokens=4 * 16)
    r = s.post("/v1/completions", {"model": NAME, "prompt": "word " * 100, "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "KV cache" in r.json()["error"]["message"] and "64 tokens" in r.json()["error"]["message"]
    with pytest.raises(ValueError, match="kv_cache_tokens"):
        create_app(lambda: None, name=NAME, kv_cache_tokens=0)


def test_an_int8_kv_cache_server_answers_as_the_library_with_one(make_server, ref):
    """`--kv-cache-dtype int8`: the server's greedy answers are the library's with an int8 cache (the
    same engine), and its KV cache is int8; a bad value fails before anything starts."""
    s = make_server(max_batch=2, kv_cache_dtype="int8")
    assert s.health().json()["kv_cache"]["dtype"] == "int8"
    client = s.client()
    messages = [{"role": "user", "content": "Name three colours."}]
    answer = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0)
    before = ref.kv_cache_dtype
    try:
        ref.kv_cache_dtype = "int8"
        assert answer.choices[0].message.content == ref.generate(messages, max_new_tokens=12).text
        assert ref.engine_for([(8, _params(1))]).cache.quantized
    finally:
        ref.kv_cache_dtype = before
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        create_app(lambda: None, name=NAME, kv_cache_dtype="fp8")


@pytest.mark.parametrize("speculate,shown", [("ngram:4", "ngram:4:3"), ("layers:1:3", "layers:1:3")])
def test_speculating_server_answers_as_plain_generate(make_server, ref, speculate, shown):
    """`--speculate`: every request decodes with prompt lookup (or a draft model: the model's own
    first layer), and its answers, stop strings, stream and usage are those of plain `LLM.generate`
    (acceptance itself is tested in test_speculate.py)."""
    s = make_server(speculate=speculate)
    client = s.client()
    full = ref.generate(QUESTION, max_new_tokens=48).text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    for kw in ({}, {"stop": [stop]}, {"temperature": 0.9, "seed": 3}):
        expected = ref.generate(QUESTION, max_new_tokens=48, **kw)
        out = client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=48,
                                             temperature=kw.get("temperature", 0), seed=kw.get("seed"),
                                             stop=kw.get("stop"))
        assert (out.choices[0].message.content, out.choices[0].finish_reason) == (expected.text, expected.finish_reason)
        assert out.usage.completion_tokens == len(expected.token_ids)
        chunks = list(client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=48,
                                                     temperature=kw.get("temperature", 0), seed=kw.get("seed"),
                                                     stop=kw.get("stop"), stream=True,
                                                     stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
        assert chunks[-1].usage.completion_tokens == len(expected.token_ids)
    assert str(s.app.state.speculate) == shown  # every request's
    metrics = httpx.get(s.url + "/metrics", timeout=TIMEOUT).text  # the engine's counts, as vLLM names them
    engine = s.app.state.backend.engine
    assert f"phi3:spec_decode_num_draft_tokens_total {engine.draft_tokens}\n" in metrics
    assert f"phi3:spec_decode_num_accepted_tokens_total {engine.accepted_tokens}\n" in metrics
    if speculate.startswith("layers"):  # a draft model guesses at the first step at least (lookup rarely lands here)
        assert engine.draft_tokens > 0


def test_a_draft_model_that_cannot_serve_fails_the_start(model_dir, ref, tmp_path):
    """`--speculate MODEL` with a model that is not there: the server never says ok, its status is
    failed with the load's exit code (2), as a model that does not load."""
    s = Server(create_app(_load(model_dir, ref.stop_ids), name=NAME, speculate=str(tmp_path / "no-draft")))
    try:
        _until(lambda: s.app.state.backend.status == "failed", "the start to fail")
        assert s.app.state.backend.exit_code == 2 and s.health().status_code == 503
    finally:
        s.close()


def test_a_bad_server_speculation_fails_before_serving():
    with pytest.raises(ValueError, match="speculate must be"):
        create_app(lambda: None, name=NAME, speculate="ngram:0")
