"""Tool calls (OpenAI's `tools`, `tool_choice`, `parallel_tool_calls`): how the tools reach the
prompt, the grammar an answer follows, and the answer read back as `tool_calls`.

The model calls tools in the Hermes / Qwen format, one block per call:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Prompt: a chat template that takes the `tools` variable (transformers' convention) gets the tools
there, and the conversation's assistant `tool_calls` and `role: "tool"` messages as they are; a
template that reads the system message's `tools` (Phi-4-mini's) gets them there, as JSON text.
Phi-3's own templates have neither: the tools then go into the system message in the text of
`SYSTEM_PROMPT`, an assistant's calls become the blocks above, and a tool's result becomes a user
turn `<tool_response>…</tool_response>`.

Answer (phi3.grammar, a Lark grammar with each call's JSON schema): `tool_choice` "required" or a
named function: one or more calls (one when named or when `parallel_tool_calls` is false), each
`{"name", "arguments"}` validating against that function's parameters. "auto": either text that does
not begin with `<tool_call>`, or calls as above: the model chooses with its first tokens. "none": no
tools in the prompt, no grammar.
"""

from __future__ import annotations

import json
import re
import uuid

from .grammar import JSON_OPTIONS

OPEN, CLOSE = "<tool_call>", "</tool_call>"
SYSTEM_PROMPT = (
    "You may call functions to answer. To call one or more, answer with only these blocks, one per call:\n"
    f"{OPEN}\n{{\"name\": <function name>, \"arguments\": <arguments as a JSON object>}}\n{CLOSE}\n"
    "Otherwise answer in plain text. A function's result comes back as <tool_response>…</tool_response>.\n"
    "The functions, as JSON schemas:\n")


def check_tools(tools: list[dict]) -> list[dict]:
    """OpenAI's tool definitions, checked: a ValueError naming the first bad one."""
    for k, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise ValueError(f"tools[{k}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}")
        name = fn.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
            raise ValueError(f"tools[{k}].function.name must be 1 to 64 letters, digits, '_', '.' or '-', got {name!r}")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ValueError(f"tools[{k}].function.parameters must be a JSON schema object")
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise ValueError("tools must have distinct names")
    return tools


def _parameters(tool: dict) -> dict:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def call_grammar(tools: list[dict], choice: str | dict, parallel: bool) -> str | None:
    """The Lark grammar (llguidance's dialect) of an answer under `tool_choice`; None for "none"."""
    if choice == "none":
        return None
    named = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    chosen = [t for t in tools if named is None or t["function"]["name"] == named]
    one_call = {"anyOf": [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                             "arguments": _parameters(t)},
                           "required": ["name", "arguments"], "additionalProperties": False} for t in chosen],
                "x-guidance": JSON_OPTIONS}
    lines = [f"call: {json.dumps(OPEN + chr(10))} %json {json.dumps(one_call)} {json.dumps(chr(10) + CLOSE)}",
             'calls: call ("\\n" call)*' if parallel and named is None else "calls: call"]
    if choice == "auto":  # text that does not begin with OPEN (a proper prefix of it included), or calls
        text = "|".join([re.escape(OPEN[:i]) + "[^" + re.escape(OPEN[i]) + "](?s:.*)" for i in range(len(OPEN))]
                        + [re.escape(OPEN[:i]) for i in range(len(OPEN))])
        lines = ["start: TEXT | calls", *lines, f"TEXT: /{text}/"]
    else:
        lines = ["start: calls", *lines]
    return "\n".join(lines) + "\n"


# -- the prompt ------------------------------------------------------------------------------------
def template_messages(messages: list[dict], tools: list[dict] | None, template: str) -> tuple[list[dict], dict]:
    """Messages (OpenAI's, with `tool_calls` and `role: "tool"`) and the extra template variables
    for `template`, as the module docstring says."""
    if re.search(r"(?<![\w'\".])tools(?![\w'\"])", template):  # the template reads the `tools` variable
        return [{**m, "content": m.get("content") or ""} for m in messages], {"tools": tools}
    out = [_plain(m) for m in messages]
    if not tools:
        return out, {}
    if re.search(r"message\[['\"]tools['\"]\]|message\.tools", template):  # Phi-4-mini: tools in the system turn
        if out[0]["role"] != "system":
            out.insert(0, {"role": "system", "content": ""})
        out[0] = {**out[0], "tools": json.dumps(tools, ensure_ascii=False)}
        return out, {}
    listing = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    if out[0]["role"] == "system":
        out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + SYSTEM_PROMPT + listing}
    else:
        out.insert(0, {"role": "system", "content": SYSTEM_PROMPT + listing})
    return out, {}


def _plain(message: dict) -> dict:
    """A message in the roles every template knows: calls as blocks, a tool's result as a user turn."""
    content = message.get("content") or ""
    if message.get("role") == "tool":
        return {"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"}
    calls = message.get("tool_calls")
    if message.get("role") == "assistant" and calls:
        blocks = [format_call(c["function"]["name"], c["function"]["arguments"]) for c in calls]
        return {"role": "assistant", "content": "\n".join(([content] if content else []) + blocks)}
    return {k: v for k, v in message.items() if k in ("role", "content")} | {"content": content}


def format_call(name: str, arguments: str | dict) -> str:
    """One call as the model writes it."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{CLOSE}"


# -- the answer ------------------------------------------------------------------------------------
class CallStream:
    """One choice's text -> (content, tool calls) as OpenAI's chat deltas, text pushed as it comes.

    Text that could still be the start of `<tool_call>` is held back; once the answer is seen to be
    calls, each call is sent when its block closes (a delta with id, type and name, then one with
    the arguments)."""

    def __init__(self):
        self.text, self.sent, self.mode = "", 0, None  # mode: None (undecided), "text" or "calls"
        self.calls: list[dict] = []

    def push(self, piece: str) -> tuple[str, list[dict]]:
        """New content text and new tool-call deltas."""
        self.text += piece
        if self.mode is None:
            if self.text.startswith(OPEN):
                self.mode = "calls"
            elif not OPEN.startswith(self.text):
                self.mode = "text"
        if self.mode == "text":
            out, self.sent = self.text[self.sent:], len(self.text)
            return out, []
        if self.mode == "calls":
            return "", self._new_calls()
        return "", []

    def close(self, finish_reason: str) -> tuple[str, list[dict], str]:
        """What is left, the deltas of the last calls, and the finish reason ("tool_calls" for calls)."""
        if self.mode == "calls":
            deltas = self._new_calls()
            if finish_reason == "stop" and self.calls:
                return "", deltas, "tool_calls"
            return "", deltas, finish_reason
        out, self.sent = self.text[self.sent:], len(self.text)
        return out, [], finish_reason

    def _new_calls(self) -> list[dict]:
        deltas = []
        for match in re.finditer(re.escape(OPEN) + r"\n(.*?)\n" + re.escape(CLOSE), self.text[self.sent:], re.S):
            try:
                call = json.loads(match.group(1))
                name, arguments = call["name"], json.dumps(call["arguments"], ensure_ascii=False)
            except (ValueError, KeyError, TypeError):
                continue
            k = len(self.calls)
            self.calls.append({"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                               "function": {"name": name, "arguments": arguments}})
            deltas += [{"index": k, "id": self.calls[k]["id"], "type": "function",
                        "function": {"name": name, "arguments": ""}},
                       {"index": k, "function": {"arguments": arguments}}]
            end = self.sent + match.end()
        if deltas:
            self.sent = end
        return deltas
