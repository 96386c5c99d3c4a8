"""Preference plugin for LLaMA-Factory's ShareGPT pair files (dpo_en_demo.json, dpo_zh_demo.json):
{"conversations": [{"from": "system"|"human"|"gpt", "value"}, ...], "chosen": {"from": "gpt",
"value"}, "rejected": {...}} -> {"messages", "chosen", "rejected"} rows for --encode_type preference.

    llm-encode --encode_type preference --template chatml --data_loader_path \
        encoder/user_data_loader/dpo_sharegpt.py \
        --data_loader_args path=../shared/data/dpo_en_demo.json ...

The prompt turns keep their roles (system, human -> user, gpt -> assistant); an optional
record-level "system" string becomes the system message. Accepts part/num_parts.
"""

import json
from pathlib import Path

ROLE_MAP = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
            "assistant": "assistant"}


def _message(turn: dict) -> dict:
    role = turn.get("from", turn.get("role"))
    if role not in ROLE_MAP:
        raise ValueError(f"unknown ShareGPT role {role!r}; known: {sorted(ROLE_MAP)}")
    return {"role": ROLE_MAP[role], "content": turn.get("value", turn.get("content"))}


def to_pair(record: dict) -> dict:
    """One LLaMA-Factory preference record -> a preference row."""
    turns = record.get("conversations") or record.get("messages") or []
    messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    messages += [_message(t) for t in turns]
    out = {"messages": messages}
    for key in ("chosen", "rejected"):
        value = record.get(key)
        out[key] = _message(value) if isinstance(value, dict) else value
    return out


def data_loader(path, part=None, num_parts=None):
    records = [r for one in str(path).split(",")
               for r in json.loads(Path(one).read_text(encoding="utf-8"))]
    if part is not None:
        n = len(records)
        records = records[int(part) * n // int(num_parts):(int(part) + 1) * n // int(num_parts)]
    for record in records:
        yield to_pair(record)
