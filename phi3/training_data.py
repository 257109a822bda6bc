"""Fine-tuning data: JSONL lines -> token ids and the positions whose loss counts.

Two line formats (those of TRL and of the OpenAI fine-tuning API):

- chat: `{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}`; the
  loss counts every assistant turn but those marked `"weight": 0` (as the OpenAI API allows);
- prompt/completion: `{"prompt": "...", "completion": "..."}` as raw text (no template; the loss
  counts the completion and an end-of-text token, as TRL does), or both as message lists (the
  conversational form; the loss counts the assistant turns of the completion).

Assistant tokens are found through the model's own chat template, never by guessing token ids:
the conversation is rendered once; each assistant turn starts where the conversation before it,
rendered with the generation prompt, ends, and ends where the conversation up to it stops agreeing
with the same conversation followed by another user turn (so a template's end-of-conversation
token is not part of the turn). Tokens are mapped to those character spans by the tokenizer's
offsets: a token counts when it ends inside an assistant span.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .tokenizer import ChatTemplateError, Tokenizer

ROLES = ("system", "user", "assistant")
_PROBE = {"role": "user", "content": "x"}


class DataError(ValueError):
    """A training file, or a line of it, that cannot be used; the message names the file and line."""


@dataclass
class Example:
    ids: list[int]
    labels: list[bool]  # True where the token is one the model learns to produce
    line: int  # 1-based line in the file

    @property
    def n_labels(self) -> int:
        return sum(self.labels)


@dataclass
class Dataset:
    examples: list[Example]
    dropped: list[int]  # lines of examples longer than max_len
    path: Path


def read_jsonl(path: str | os.PathLike, tokenizer: Tokenizer, max_len: int) -> Dataset:
    """Tokenize every example of the JSONL file at `path`; examples longer than `max_len` tokens
    are dropped (their lines listed in `dropped`). Raises DataError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    examples, dropped = [], []
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                text = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a byte-order mark may open the file
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not text.strip():
                continue
            try:
                record = json.loads(text.rstrip("\r\n"))  # else an error at the line's end is "line 2 column 1"
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            ids, labels = encode_record(record, tokenizer, where)
            if not any(labels[1:]):
                raise DataError(f"{where}: no tokens to learn (the assistant's answer renders as nothing)")
            if len(ids) > max_len:
                dropped.append(n)
                continue
            examples.append(Example(ids, labels, n))
    if not examples:
        why = (f"all {len(dropped)} examples are longer than max_len={max_len} tokens" if dropped
               else "it holds no examples (the file is empty)")
        raise DataError(f"{path}: nothing to train on: {why}")
    return Dataset(examples, dropped, path)


def encode_record(record, tokenizer: Tokenizer, where: str) -> tuple[list[int], list[bool]]:
    """(token ids, labels) of one parsed JSONL record; `where` ("file:line") prefixes errors."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = _messages(record["messages"], where, "messages")
        learn = [i for i, m in enumerate(messages) if m["role"] == "assistant" and record["messages"][i].get("weight", 1)]
        if not learn:
            raise DataError(f"{where}: the conversation has no assistant turn to learn from")
        return _encode_chat(messages, learn, tokenizer, where)
    if "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            if not completion:
                raise DataError(f"{where}: the completion is empty")
            return _encode_text(prompt, completion, tokenizer)
        if isinstance(prompt, list) and isinstance(completion, list):
            messages = _messages(prompt, where, "prompt") + _messages(completion, where, "completion")
            learn = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= len(prompt)]
            if not learn:
                raise DataError(f"{where}: the completion has no assistant turn to learn from")
            return _encode_chat(messages, learn, tokenizer, where)
        raise DataError(f"{where}: 'prompt' and 'completion' must both be strings or both lists of messages")
    raise DataError(f"{where}: expected a 'messages' list, or 'prompt' and 'completion'; got keys {sorted(record)}")


def _messages(value, where: str, field: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: '{field}' must be a non-empty list of messages")
    out = []
    for k, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or not isinstance(m.get("role"), str):
            raise DataError(f"{where}: {field}[{k}] must be an object with string 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: {field}[{k}] has unknown role {m['role']!r} (expected one of {', '.join(ROLES)})")
        if m.get("weight", 1) not in (0, 1) or isinstance(m.get("weight"), bool):
            raise DataError(f"{where}: {field}[{k}] has weight {m['weight']!r}; it must be 0 or 1")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _encode_text(prompt: str, completion: str, tokenizer: Tokenizer) -> tuple[list[int], list[bool]]:
    """Raw text: tokens ending past the prompt are learned, then the end-of-text token."""
    ids, offsets = tokenizer.encode_with_offsets(prompt + completion)
    labels = [end > len(prompt) for _, end in offsets]
    if tokenizer.eos_id is not None and ids[-1:] != [tokenizer.eos_id]:
        ids, labels = ids + [tokenizer.eos_id], labels + [True]
    return ids, labels


def _encode_chat(messages: list[dict], learn: list[int], tokenizer: Tokenizer, where: str) -> tuple[list[int], list[bool]]:
    if tokenizer.chat_template is None:
        raise DataError(f"{where}: chat data needs a chat template, and this model's tokenizer has none; "
                        "use raw prompt/completion strings instead")
    if learn[0] == 0:
        raise DataError(f"{where}: the conversation starts with an assistant turn; start it with a system or user message")

    def render(msgs: list[dict], generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(msgs, add_generation_prompt=generation_prompt)
        except ChatTemplateError as e:
            raise DataError(f"{where}: {e}") from None

    full = render(messages, False)
    spans = []
    for i in learn:
        before = render(messages[:i], True)
        upto, probed = render(messages[:i + 1], False), render(messages[:i + 1] + [_PROBE], False)
        start, end = len(before), len(os.path.commonprefix([upto, probed]))
        if not (start <= end and full.startswith(before) and full.startswith(upto[:end])):
            raise DataError(f"{where}: the chat template renders turn {i} differently depending on what follows "
                            "it, so the assistant's tokens cannot be found")
        spans.append((start, end))
    ids, offsets = tokenizer.encode_with_offsets(full, add_special_tokens=False)  # as prompts are at inference
    labels = [e > s_tok and any(s < e <= stop for s, stop in spans) for s_tok, e in offsets]
    return ids, labels
