"""OpenAI-style messages JSONL plugin (chat): one conversation per line,
{"messages": [...], "tools": [...]?} as sent to / logged from the OpenAI Chat Completions API.

    llm-encode --encode_type chat --data_loader_path encoder/user_data_loader/openai_messages.py \
        --data_loader_args path=train.jsonl --tokenizer_path ../shared/tokenizers/qwen3 ...

Messages pass through in the OpenAI / Hugging Face shape: roles system/user/assistant/tool,
assistant "tool_calls" ([{"id", "type": "function", "function": {"name", "arguments": JSON string}}]),
tool "tool_call_id", optional "reasoning_content". The encoder checks them and parses JSON-string
arguments into dicts (encoder/conversation.py). The legacy "function" role and "function_call"
field are mapped to "tool" / "tool_calls". Blank lines are skipped; a bad JSON line raises naming
its file and byte offset. `path`: comma-separated paths, globs, s3:// / gs:// URLs. Part-aware
(part_index/num_parts): the input is cut by bytes (encoder/input_files.py).
"""

from encoder.input_files import expand_paths, json_line, lines_of_part


def to_row(record: dict) -> dict:
    """One JSONL record -> the encoder's chat row (legacy function-calling fields mapped)."""
    messages = []
    for m in record.get("messages", []):
        m = dict(m)
        if m.get("role") == "function":                       # legacy: a function result
            m["role"] = "tool"
        if "function_call" in m and m.get("function_call"):   # legacy: one call per message
            m["tool_calls"] = [{"type": "function", "function": m.pop("function_call")}]
        m.pop("function_call", None)
        messages.append(m)
    row = {"messages": messages}
    tools = record.get("tools") or [{"type": "function", "function": f}
                                    for f in record.get("functions") or []]
    if tools:
        row["tools"] = tools
    return row


def data_loader(path, part_index=None, num_parts=None):
    for name, offset, line in lines_of_part(expand_paths(str(path)), part_index, num_parts):
        if line.strip():
            yield to_row(json_line(name, offset, line))
