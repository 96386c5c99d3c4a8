"""Chat rows with tools: the row schema, its checks, and the `Conversation` the encoder passes on.

A chat row is `{"messages": [...], "tools": [...] (optional)}` in the OpenAI / Hugging Face shape:
  {"role": "system" | "user", "content": str}
  {"role": "assistant", "content": str | None, "tool_calls": [call, ...] (optional),
   "reasoning_content" (or "thinking" / "reasoning"): str (optional; rendered where the chat
   template supports it; transformers passes every spelling to the template)}
  {"role": "tool", "content": str, "name"/"tool_call_id": ... (optional, passed to the template)}
  call  = {"type": "function", "function": {"name": str, "arguments": dict | JSON-object string}}
  tools = JSON schemas, {"type": "function", "function": {"name", "description", "parameters"}}

Normalisation (what Hugging Face chat templates expect, so e.g. Llama-3.1 does not print escaped
JSON): string `arguments` are parsed into a dict; a bare `{"name", "arguments"}` call and a bare
`{"name", "description", "parameters"}` tool are wrapped as `{"type": "function", "function": ...}`.
Every other key of a message is kept and handed to the template unchanged.

Plain rows (only system/user/assistant with `content`) keep the older, stricter check
(alternating turns) in encoder/plugins.py and stay plain lists of messages.

>>> conv = check_conversation({"messages": [
...     {"role": "user", "content": "Weather in Paris?"},
...     {"role": "assistant", "tool_calls": [{"name": "weather", "arguments": '{"city": "Paris"}'}]},
...     {"role": "tool", "content": "sunny"},
...     {"role": "assistant", "content": "It is sunny."}]})
>>> conv[1]["tool_calls"][0]
{'type': 'function', 'function': {'name': 'weather', 'arguments': {'city': 'Paris'}}}
>>> len(conv), conv.tools
(4, None)
"""

from __future__ import annotations

import json
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
# spellings transformers 5 hands to every chat template (utils/chat_template_utils.py)
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
TOOL_KEYS = ("tool_calls", *REASONING_KEYS)


class Conversation(list):
    """A list of messages that also carries the row's `tools` (None when the row has none)."""

    def __init__(self, messages: list[dict] = (), *, tools: list[dict] | None = None):
        super().__init__(messages)
        self.tools = tools or None

    def __reduce__(self):  # worker processes receive rows by pickle: keep `tools`
        return (_rebuild, (list(self), self.tools))


def _rebuild(messages: list[dict], tools: list[dict] | None) -> "Conversation":
    return Conversation(messages, tools=tools)


def tools_of(messages: list[dict]) -> list[dict] | None:
    return getattr(messages, "tools", None)


def uses_tool_format(messages: list[dict]) -> bool:
    """True if rendering needs a template that knows tools / tool calls / tool roles / reasoning."""
    return bool(tools_of(messages)) or any(
        m.get("role") == "tool" or any(m.get(k) for k in TOOL_KEYS) for m in messages)


def is_tool_row(row: dict) -> bool:
    """Does this chat row use any part of the tool format (so it needs the checks here)?"""
    msgs = row.get("messages")
    return "tools" in row or (isinstance(msgs, list) and any(
        isinstance(m, dict) and (m.get("role") == "tool" or any(k in m for k in TOOL_KEYS))
        for m in msgs))


def check_conversation(row: dict, *, require_answer: bool = True) -> Conversation:
    """Validate and normalise a tool-format chat row; ValueError names the message and the fix.

    `require_answer=False` checks a prompt (trainer.generate): it may end with any role.
    """
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ValueError("key 'messages' must be a non-empty list of message dicts")
    tools = _check_tools(row.get("tools"))
    out = [_check_message(k, m) for k, m in enumerate(msgs)]
    _check_order(out, require_answer=require_answer)
    return Conversation(out, tools=tools)


def _check_tools(tools: Any) -> list[dict] | None:
    if tools is None:
        return None
    if isinstance(tools, str):
        raise ValueError("'tools' is a string; parse it in the plugin (json.loads) into a list of "
                         "JSON schemas")
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ValueError(f"'tools' must be a list of JSON-schema dicts, got {tools!r:.80}")
    out = []
    for k, tool in enumerate(tools):
        fn = tool.get("function") if tool.get("type") == "function" else tool
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"tools[{k}] has no function name: expected {{'type': 'function', "
                             f"'function': {{'name', 'description', 'parameters'}}}}, got {tool!r:.80}")
        out.append(tool if tool.get("type") == "function" else {"type": "function", "function": tool})
    return out


def _check_message(k: int, m: Any) -> dict:
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        raise ValueError(f"message {k} must be a dict with 'role' one of {ROLES}, got {m!r:.80}")
    role, content = m["role"], m.get("content")
    calls = m.get("tool_calls")
    if calls is not None and role != "assistant":
        raise ValueError(f"message {k}: only assistant messages carry 'tool_calls' (role is {role!r})")
    if not isinstance(content, str) and not (role == "assistant" and content is None):
        raise ValueError(f"message {k} ({role}): 'content' must be str, got "
                         f"{type(content).__name__}" + (" (None is allowed only for an assistant "
                                                        "message with tool_calls)" if content is None else ""))
    out = dict(m)
    if isinstance(content, str):
        out["content"] = _utf8(content, f"message {k}")
    for key in REASONING_KEYS:
        if key in m and m[key] is not None:
            if role != "assistant" or not isinstance(m[key], str):
                raise ValueError(f"message {k}: {key!r} must be a str on an assistant message")
            out[key] = _utf8(m[key], f"message {k} {key}")
    if calls is not None:
        if not isinstance(calls, list):
            raise ValueError(f"message {k}: 'tool_calls' must be a list, got {type(calls).__name__}")
        out["tool_calls"] = [_check_call(k, j, c) for j, c in enumerate(calls)]
    if role == "assistant" and not (content or "").strip() and not out.get("tool_calls"):
        raise ValueError(f"assistant message {k} is empty (no content, no tool_calls)")
    return out


def _check_call(k: int, j: int, call: Any) -> dict:
    where = f"message {k} tool_calls[{j}]"
    if not isinstance(call, dict):
        raise ValueError(f"{where} must be a dict, got {type(call).__name__}")
    fn = call.get("function", call)
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ValueError(f"{where} needs {{'function': {{'name': str, 'arguments': dict}}}}, "
                         f"got {call!r:.80}")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: 'arguments' is a string but not JSON ({e}); give a dict "
                             f"or a JSON-object string") from None
    if not isinstance(args, dict):
        raise ValueError(f"{where}: 'arguments' must be a JSON object, got {type(args).__name__}")
    out = {k2: v for k2, v in call.items() if k2 not in ("function", "name", "arguments")}
    out.setdefault("type", "function")
    out["function"] = {**{k2: v for k2, v in fn.items() if k2 != "arguments"}, "arguments": args}
    return out


def _check_order(msgs: list[dict], *, require_answer: bool) -> None:
    """system only first; then a user; a tool message follows an assistant tool call (or another
    tool message); a training row ends with an assistant message."""
    for k, m in enumerate(msgs):
        role = m["role"]
        prev = msgs[k - 1] if k else None
        if role == "system" and k:
            raise ValueError(f"message {k}: a system message may only come first")
        if role != "system" and (prev is None or prev["role"] == "system") and role != "user":
            raise ValueError(f"message {k} has role {role!r}; the first turn after the optional "
                             f"system message must be 'user'")
        if role == "tool" and not (prev["role"] == "tool" or prev.get("tool_calls")):
            raise ValueError(f"message {k}: a 'tool' message must follow an assistant message with "
                             f"tool_calls (or another tool message)")
    if require_answer and msgs[-1]["role"] != "assistant":
        raise ValueError("conversation does not end with an assistant turn (nothing to train on)")


def _utf8(value: str, what: str) -> str:
    from encoder.plugins import _utf8_text
    return _utf8_text(value, what)
