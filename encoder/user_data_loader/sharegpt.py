"""ShareGPT multi-turn plugin (chat): {"conversations": [{"from": ..., "value": ...}], "tools"?, "system"?}.

    llm-encode --encode_type chat --data_loader_path encoder/user_data_loader/sharegpt.py \
        --data_loader_args path=../shared/data/glaive_toolcall_en_demo.json ...

Roles (the glaive / LLaMA-Factory convention): system -> system, human/user -> user,
gpt/assistant -> assistant, function_call -> assistant `tool_calls` (its value is the JSON call
{"name", "arguments"} or a list of them; it joins a directly preceding assistant text turn),
observation -> role "tool". A record-level "tools" (a JSON string or a list of function schemas)
becomes the row's `tools`; a record-level "system" string the system message. Unknown roles raise
(the encoder names the row). `path`: JSON arrays or JSON Lines (`.jsonl`), comma-separated, globs
and s3:// / gs:// URLs. Part-aware (part_index/num_parts): `.jsonl` input is cut by bytes (part k
reads ~1/N); JSON arrays are parsed whole, sliced by record.
"""

import json
from pathlib import Path

from encoder.input_files import expand_paths, json_records_of_part

DEFAULT_PATH = Path(__file__).with_name("sample_sharegpt.json")
ROLE_MAP = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
            "assistant": "assistant", "function_call": "assistant", "observation": "tool"}


def to_messages(record: dict) -> dict:
    """One ShareGPT record -> `{"messages": [...], "tools": [...]}` (no "tools" key when none)."""
    turns = record.get("conversations") or record.get("messages") or []
    messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    for turn in turns:
        role = turn.get("from", turn.get("role"))
        if role not in ROLE_MAP:
            raise ValueError(f"unknown ShareGPT role {role!r}; known: {sorted(ROLE_MAP)}")
        value = turn.get("value", turn.get("content"))
        if role == "function_call":
            calls = _tool_calls(value)
            last = messages[-1] if messages else None
            if last and last["role"] == "assistant" and "tool_calls" not in last:
                last["tool_calls"] = calls         # "text, then call" is one assistant turn
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": calls})
        else:
            messages.append({"role": ROLE_MAP[role], "content": value})
    row = {"messages": messages}
    tools = record.get("tools")
    if isinstance(tools, str):
        tools = json.loads(tools) if tools.strip() else None
    if tools:
        row["tools"] = tools
    return row


def _tool_calls(value) -> list:
    """A function_call turn's value -> OpenAI/HF `tool_calls` (arguments kept as given; the
    encoder parses JSON-string arguments)."""
    calls = json.loads(value) if isinstance(value, str) else value
    calls = calls if isinstance(calls, list) else [calls]
    if not all(isinstance(c, dict) and "name" in c for c in calls):
        raise ValueError(f"function_call value must be a JSON object {{'name', 'arguments'}} or a "
                         f"list of them, got {value!r:.80}")
    return [{"type": "function", "function": {"name": c["name"], "arguments": c.get("arguments", {})}}
            for c in calls]


def data_loader(path=str(DEFAULT_PATH), part_index=None, num_parts=None):
    for record in json_records_of_part(expand_paths(str(path)), part_index, num_parts):
        yield to_messages(record)
