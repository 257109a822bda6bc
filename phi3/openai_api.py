"""OpenAI's API shapes for `phi3.server`: request validation, the mapping onto `SamplingParams`,
response and stream-chunk bodies, and errors in OpenAI's envelope.

Defaults are OpenAI's, so code written for OpenAI gets what it expects: `temperature` 1 and
`top_p` 1 (sampling: send `temperature: 0` for greedy decoding, `LLM.generate`'s default), `n` 1,
`max_tokens` the rest of the context. Where we differ from OpenAI:
- `top_p: 0` keeps only the most likely token (top_k = 1); OpenAI does not say what it does.
- `stop`: up to 16 strings (OpenAI: 4). `seed`: any int64; a negative seed is taken modulo 2**63.
  Choice 0 of a seeded request uses the seed itself (so it equals `LLM.generate(..., seed=s)`);
  choice i > 0 a seed derived from (seed, i).
- Accepted only at their neutral values, else a 400 naming the parameter: `logit_bias`,
  `presence_penalty`, `frequency_penalty`, `functions` (use `tools`), and for /v1/completions
  `suffix`, `best_of` != n, `echo` with `stream`.
- /v1/completions `echo: true` puts the prompt before each choice's text and, with `logprobs`, the
  prompt tokens' log-probabilities before the answer's (the first token's null; `phi3.scoring`);
  `max_tokens: 0` (only with `echo`) scores the prompt without generating: what lm-eval's
  `local-completions` asks for log-likelihood tasks.
- Structured output (see `structured`): chat's `response_format` (`json_object`, `json_schema`),
  and vLLM's extensions on both endpoints: `guided_json`, `guided_regex`, `guided_choice`,
  `guided_grammar`, or its newer `structured_outputs` object (`json`, `regex`, `choice`, `grammar`,
  `json_object`). At most one of them per request. JSON comes out compact (`", "`, `": "`).
- Tools (see `phi3.tools`): `tools`, `tool_choice` ("auto" by default with tools, "none",
  "required", a named function), `parallel_tool_calls`; with "none" the tools stay out of the prompt. Other fields we do not know are
  ignored, as vLLM does.
- Log-probabilities (chat: `logprobs: true` and `top_logprobs` 0..20, which needs `logprobs`;
  /v1/completions: `logprobs` 0..5) are the model's own, before temperature, penalties and filters
  (vLLM's default): `log_softmax` of the logits at each position. How a token is shown (`token`,
  `bytes`, `text_offset`) and which tokens a stop string leaves in: see `phi3.logprobs`. As OpenAI,
  chat's `top_logprobs` are the k most likely tokens; /v1/completions' `top_logprobs` add the chosen
  token when it is not among them (up to k + 1 entries; a text shared by two tokens keeps the more
  likely). `text_offset` counts from the start of the completion's text (OpenAI counts the prompt's
  characters too; a prompt of token ids has none).
- Extensions with vLLM's names: `top_k`, `min_p`, `repetition_penalty`, `ignore_eos`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .grammar import check as check_constraint
from .logprobs import TokenLogprob
from .sampling import SamplingParams
from .tools import call_grammar, check_tools

MAX_N = 128  # choices per request (OpenAI's cap)
MAX_STOP = 16  # stop strings per request
_CHOICE_SEED_STEP = 0x9E3779B97F4A7C15  # the golden ratio in 64 bits: choices' seeds far apart


class APIError(Exception):
    """An error for the client: HTTP status and OpenAI's `{"error": {message, type, param, code}}`."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# -- requests --------------------------------------------------------------------------------------
Float = Annotated[float, Field(allow_inf_nan=False)]


class _Model(BaseModel):
    # strict: "1" is not a number and true is not an integer, as in OpenAI's API
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Model):
    include_usage: bool | None = False


class TextPart(_Model):
    type: Literal["text"]
    text: str


class FunctionCall(_Model):
    name: str
    arguments: str


class ToolCall(_Model):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None  # None only for an assistant's tool calls
    tool_calls: list[ToolCall] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # a tool's result: the call it answers

    @model_validator(mode="after")
    def _content(self):
        if self.content is None and self.role != "assistant":
            raise ValueError("content is required (only an assistant message with tool_calls may leave it out)")
        return self

    def as_dict(self) -> dict:
        """The message as the chat template sees it (OpenAI's "developer" is the system role)."""
        content = self.content or ""
        text = content if isinstance(content, str) else "".join(p.text for p in content)
        out = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class _Request(_Model):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: Float | None = Field(None, ge=0, le=2)
    top_p: Float | None = Field(None, ge=0, le=1)
    n: int | None = Field(None, ge=1, le=MAX_N)
    seed: int | None = Field(None, ge=-2**63, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: Float | None = Field(None, ge=-2, le=2)
    frequency_penalty: Float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, Float] | None = None
    top_k: int | None = Field(None, ge=-1)  # extensions: vLLM's names; top_k -1 or 0 is off
    min_p: Float | None = Field(None, ge=0, le=1)
    repetition_penalty: Float | None = Field(None, gt=0, le=100)
    ignore_eos: bool | None = False
    guided_json: dict | str | None = None  # structured output: vLLM's extensions (see `structured`)
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stop

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def unsupported(self) -> list[tuple[str, bool]]:
        return [("presence_penalty", bool(self.presence_penalty)), ("frequency_penalty", bool(self.frequency_penalty)),
                ("logit_bias", bool(self.logit_bias))]


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list | None = None
    functions: list | None = None
    response_format: dict | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None

    @property
    def alternatives(self) -> int | None:
        """How many alternatives per token to report, None for no log-probabilities."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def unsupported(self):
        return super().unsupported() + [
            ("functions", bool(self.functions))]


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0 with `echo`: the prompt's log-probabilities only
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    logprobs: int | None = Field(None, ge=0, le=5)

    @property
    def alternatives(self) -> int | None:
        return self.logprobs

    def unsupported(self):
        return super().unsupported() + [
            ("echo", bool(self.echo and self.stream)), ("suffix", bool(self.suffix)),
            ("best_of", self.best_of is not None and self.best_of != (self.n or 1))]


_FIELDS = {name for cls in (ChatRequest, CompletionRequest, Message, TextPart, StreamOptions, ToolCall, FunctionCall)
           for name in cls.model_fields}
_EXPECTED = {"stop": "a string or a list of strings", "content": "a string or a list of text parts",
             "prompt": "a string, a list of strings, a list of token ids or a list of lists of token ids"}


def parse(cls: type[_Request], body: bytes) -> _Request:
    """Validate a JSON body; a 400 naming the first bad parameter, or the unsupported one."""
    try:
        req = cls.model_validate_json(body)
    except ValidationError as e:
        raise _bad_request(e.errors(include_url=False, include_input=False)) from None
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "'stream_options' is only allowed when 'stream' is true", param="stream_options")
    if isinstance(req, CompletionRequest) and req.max_tokens == 0 and not req.echo:
        raise APIError(400, "'max_tokens' 0 needs 'echo': true (the prompt's log-probabilities)", param="max_tokens",
                       code="invalid_value")
    if isinstance(req, ChatRequest) and req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "'top_logprobs' needs 'logprobs' to be true", param="top_logprobs", code="invalid_value")
    for name, bad in req.unsupported():
        if bad:
            raise APIError(400, f"'{name}' is not supported by this server (leave it out or at its default)",
                           param=name, code="unsupported_parameter")
    return req


def _bad_request(errors: list[dict]) -> APIError:
    first = errors[0]
    if first["type"] == "json_invalid":
        return APIError(400, f"The body is not valid JSON: {first['msg'].removeprefix('Invalid JSON: ')}",
                        code="invalid_json")
    if not first["loc"]:
        return APIError(400, "The body must be a JSON object", code="invalid_json")
    param = _param(first["loc"])
    same = [e for e in errors if _param(e["loc"]) == param]
    leaf = param.rsplit(".", 1)[-1].split("[")[0]
    if len(same) > 1 and leaf in _EXPECTED:  # a union: name what is accepted instead of each alternative
        return APIError(400, f"'{param}' must be {_EXPECTED[leaf]}", param=param, code="invalid_type")
    if first["type"] == "missing":
        return APIError(400, f"Missing required parameter '{param}'", param=param, code="missing_required_parameter")
    return APIError(400, f"Invalid value for '{param}': {first['msg'].removeprefix('Value error, ')}", param=param,
                    code="invalid_type" if first["type"].endswith("_type") else "invalid_value")


def _param(loc: tuple) -> str:
    """Dotted path of a validation error's location, without pydantic's union tags."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _FIELDS:
            out += ("." if out else "") + part
        else:
            break
    return out


# -- requests -> engine work -----------------------------------------------------------------------
def prompts(req: _Request, encode: Callable) -> list[list[int]]:
    """Token ids of each prompt (one for chat; /v1/completions takes a batch); `encode` is
    `LLM.encode_prompt`. A 400 for messages the template rejects or ids outside the vocabulary."""
    param = "messages" if isinstance(req, ChatRequest) else "prompt"
    tools = None
    if isinstance(req, ChatRequest):
        items = [[m.as_dict() for m in req.messages]]
        tools = req.tools if tool_choice(req) != "none" else None  # checked by tool_choice
    elif isinstance(req.prompt, str) or (req.prompt and isinstance(req.prompt[0], int)):
        items = [req.prompt]
    else:
        items = list(req.prompt)
    if not items or any(len(p) == 0 for p in items):
        raise APIError(400, f"'{param}' must not be empty", param=param)
    try:
        return [encode(p, tools) if tools else encode(p) for p in items]
    except ValueError as e:
        raise APIError(400, f"Invalid '{param}': {e}", param=param) from None


def completion_budget(req: _Request, prompt_tokens: int, context: int,
                      limit: str = "This model's maximum context length") -> int:
    """New tokens for a prompt: the request's max (a 400 `context_length_exceeded` when the prompt
    and it do not fit the context, `limit` saying what sets it), or, when not given, the rest of the context."""
    asked = getattr(req, "max_completion_tokens", None) or req.max_tokens
    if req.max_tokens == 0 and prompt_tokens <= context:  # echo only
        return 0
    if prompt_tokens + (asked or 1) <= context:
        return asked or context - prompt_tokens
    param = "messages" if isinstance(req, ChatRequest) else "prompt"
    wanted = f"{prompt_tokens + asked} tokens ({prompt_tokens} in the prompt, {asked} for the completion)" if asked \
        else f"{prompt_tokens} tokens in the prompt and at least 1 for the completion"
    raise APIError(400, f"{limit} is {context} tokens. However, you requested {wanted}. "
                   "Please reduce the length of the prompt or of the completion.",
                   param="max_tokens" if asked else param, code="context_length_exceeded")


def sampling_params(req: _Request, max_new: int, choice: int, speculate=None) -> SamplingParams:
    """The engine's parameters for choice `choice` of a request (OpenAI's defaults; see the module
    docstring), with the server's speculative decoding."""
    top_p = 1.0 if req.top_p is None else req.top_p
    top_k = max(req.top_k or 0, 0)
    if top_p == 0:
        top_p, top_k = 1.0, 1
    seed = None
    if req.seed is not None:
        seed = req.seed % 2**63 if choice == 0 else (req.seed + choice * _CHOICE_SEED_STEP) % 2**63
    return SamplingParams(max_new_tokens=max_new, temperature=1.0 if req.temperature is None else req.temperature,
                          top_p=top_p, top_k=top_k, min_p=req.min_p or 0.0,
                          repetition_penalty=req.repetition_penalty or 1.0, seed=seed, stop=req.stops,
                          logprobs=req.alternatives, speculate=speculate, **structured(req))


# -- structured output and tools -------------------------------------------------------------------
_VLLM = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}


def structured(req: _Request) -> dict:
    """SamplingParams' constraint keyword for a request ({} for none); a 400 naming the parameter
    when it is malformed, invalid, unsupported by the grammar library, or one of several."""
    found = []  # (param, kind, value)
    fmt = getattr(req, "response_format", None)
    if fmt is not None:
        kind = fmt.get("type")
        if kind == "json_object":
            found.append(("response_format", "json_schema", {"type": "object"}))
        elif kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
                raise APIError(400, "'response_format.json_schema' must be an object with a 'name' and a 'schema'",
                               param="response_format.json_schema", code="invalid_value")
            found.append(("response_format.json_schema.schema", "json_schema", spec.get("schema", {"type": "object"})))
        elif kind != "text":
            raise APIError(400, f"'response_format.type' must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                           param="response_format.type", code="invalid_value")
    for param, kind in (("guided_json", "json_schema"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                        ("guided_grammar", "grammar")):
        if getattr(req, param) is not None:
            found.append((param, kind, getattr(req, param)))
    for key, value in (req.structured_outputs or {}).items():
        if key in _VLLM and value is not None:
            found.append((f"structured_outputs.{key}", _VLLM[key], value))
        elif key == "json_object" and value:
            found.append(("structured_outputs.json_object", "json_schema", {"type": "object"}))
        elif key not in _VLLM and key != "json_object":
            raise APIError(400, f"'structured_outputs.{key}' is not supported (json, regex, choice, grammar, "
                           "json_object)", param=f"structured_outputs.{key}", code="unsupported_parameter")
    choice = tool_choice(req)
    if choice != "none":
        grammar = call_grammar(req.tools, choice, req.parallel_tool_calls is not False)
        found.append(("tools", "grammar", grammar))
    if len(found) > 1:
        names = ", ".join(f"'{p}'" for p, _, _ in found)
        raise APIError(400, f"give one structured-output constraint per request, got {names}", param=found[1][0],
                       code="invalid_value")
    if not found:
        return {}
    param, kind, value = found[0]
    try:
        return {kind: check_constraint(kind, value)}
    except ValueError as e:
        raise APIError(400, f"Invalid '{param}': {e}", param=param, code="invalid_value") from None


def tool_choice(req: _Request) -> str | dict:
    """The request's tool choice, checked: "none" without tools; a 400 for bad tools or choices."""
    tools, choice = getattr(req, "tools", None), getattr(req, "tool_choice", None)
    if not tools:
        if choice not in (None, "none"):
            raise APIError(400, "'tool_choice' needs 'tools'", param="tool_choice", code="invalid_value")
        return "none"
    try:
        check_tools(tools)
    except ValueError as e:
        raise APIError(400, f"Invalid 'tools': {e}", param="tools", code="invalid_value") from None
    choice = "auto" if choice is None else choice
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise APIError(400, f"'tool_choice' must be 'none', 'auto', 'required' or a named function, got {choice!r}",
                           param="tool_choice", code="invalid_value")
        return choice
    name = choice.get("function", {}).get("name") if isinstance(choice.get("function"), dict) else None
    if choice.get("type") != "function" or not isinstance(name, str):
        raise APIError(400, "'tool_choice' must be {'type': 'function', 'function': {'name': ...}}",
                       param="tool_choice", code="invalid_value")
    if name not in {t["function"]["name"] for t in tools}:
        raise APIError(400, f"'tool_choice' names the function {name!r}, which is not in 'tools'",
                       param="tool_choice", code="invalid_value")
    return choice


def calls_expected(req: _Request) -> bool:
    """Whether the answers are read for tool calls (tools given, tool_choice not "none")."""
    return tool_choice(req) != "none"


# -- responses -------------------------------------------------------------------------------------
class Chat:
    """/v1/chat/completions bodies. `tokens`: the choice's (or chunk's) `TokenLogprob`s, None when
    the request did not ask for log-probabilities."""

    request, object, chunk_object, id_prefix = ChatRequest, "chat.completion", "chat.completion.chunk", "chatcmpl-"

    @staticmethod
    def choice(index: int, text: str, finish_reason: str, tokens: list[TokenLogprob] | None = None,
               calls: list[dict] | None = None) -> dict:
        message = {"role": "assistant", "content": text}
        if calls:  # tool calls: OpenAI's content is null beside them
            message = {"role": "assistant", "content": text or None, "tool_calls": calls}
        return {"index": index, "message": message, "logprobs": Chat.logprobs(tokens), "finish_reason": finish_reason}

    @staticmethod
    def chunk_choice(index: int, text: str | None, finish_reason: str | None,
                     tokens: list[TokenLogprob] | None = None, calls: list[dict] | None = None) -> dict:
        """`text` None: the opening chunk, which carries the role. `calls`: tool-call deltas."""
        delta = {"role": "assistant", "content": ""} if text is None else {"content": text} if text else {}
        if calls:
            delta["tool_calls"] = calls
        return {"index": index, "delta": delta, "logprobs": Chat.logprobs(tokens), "finish_reason": finish_reason}

    @staticmethod
    def logprobs(tokens: list[TokenLogprob] | None) -> dict | None:
        if tokens is None:
            return None
        return {"content": [{**_chat_token(t.text, t.bytes, t.logprob),
                             "top_logprobs": [_chat_token(a.text, a.bytes, a.logprob) for a in t.top]}
                            for t in tokens], "refusal": None}


def _chat_token(text: str, data: bytes | None, logprob: float) -> dict:
    return {"token": text, "logprob": logprob, "bytes": None if data is None else list(data)}


class Completions:
    """/v1/completions bodies (`tokens` as for `Chat`)."""

    request, object, chunk_object, id_prefix = CompletionRequest, "text_completion", "text_completion", "cmpl-"

    @staticmethod
    def choice(index: int, text: str, finish_reason: str | None, tokens: list[TokenLogprob] | None = None) -> dict:
        return {"index": index, "text": text, "logprobs": Completions.logprobs(tokens), "finish_reason": finish_reason}

    @staticmethod
    def chunk_choice(index: int, text: str | None, finish_reason: str | None,
                     tokens: list[TokenLogprob] | None = None) -> dict:
        return Completions.choice(index, text or "", finish_reason, tokens)

    @staticmethod
    def logprobs(tokens: list[TokenLogprob] | None) -> dict | None:
        if tokens is None:
            return None
        top = []
        for t in tokens:
            if t.logprob is None:  # an echoed prompt's first token: nothing before it to predict it
                top.append(None)
                continue
            alternatives = {}
            for a in t.top + [t]:  # the chosen token too, as OpenAI: up to k + 1 entries
                alternatives.setdefault(a.text, a.logprob)
            top.append(alternatives)
        return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": top, "text_offset": [t.offset for t in tokens]}


def echo(llm, ids: list[int], alternatives: int | None, scored=None) -> tuple[str, list[TokenLogprob] | None]:
    """/v1/completions `echo`: the prompt's text and, when log-probabilities are asked for, its
    tokens' (the first one's null, as OpenAI's legacy API and vLLM give it): `scored`, the
    `phi3.scoring.ContinuationScore` of (ids[:1], ids[1:]) with `alternatives` top tokens (None
    for a one-token prompt)."""
    from .generate import Chunk
    from .logprobs import AnswerLogprobs, TokenTexts

    text = llm.tokenizer.decode(ids, skip_special_tokens=True)
    if alternatives is None:
        return text, None
    placed = AnswerLogprobs(TokenTexts(llm.tokenizer))
    for j, token in enumerate(ids):
        got = (0.0, []) if j == 0 else (scored.logprobs[j - 1], scored.top[j - 1] if scored.top else [])
        placed.push(token, got)
    tokens = placed.entries(Chunk(text, [], "length"))
    tokens[0].logprob, tokens[0].top = None, []
    return text, tokens


def with_echo(choice: dict, text: str, tokens: list[TokenLogprob] | None) -> dict:
    """A /v1/completions choice with the echoed prompt before its text (and its tokens before the answer's)."""
    out = {**choice, "text": text + choice["text"]}
    if tokens is not None and choice["logprobs"] is not None:
        head, tail = Completions.logprobs(tokens), choice["logprobs"]
        out["logprobs"] = {"tokens": head["tokens"] + tail["tokens"],
                           "token_logprobs": head["token_logprobs"] + tail["token_logprobs"],
                           "top_logprobs": head["top_logprobs"] + tail["top_logprobs"],
                           "text_offset": head["text_offset"] + [len(text) + o for o in tail["text_offset"]]}
    return out


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
