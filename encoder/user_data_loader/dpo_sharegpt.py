"""Preference plugin for LLaMA-Factory's ShareGPT pair files (dpo_en_demo.json, dpo_zh_demo.json):
{"conversations": [{"from": "system"|"human"|"gpt", "value"}, ...], "chosen": {"from": "gpt",
"value"}, "rejected": {...}} -> {"messages", "chosen", "rejected"} rows for --encode_type preference.

    llm-encode --encode_type preference --template chatml --data_loader_path \
        encoder/user_data_loader/dpo_sharegpt.py \
        --data_loader_args path=../shared/data/dpo_en_demo.json ...

The prompt turns keep their roles (system, human -> user, gpt -> assistant); an optional
record-level "system" string becomes the system message. "chosen"/"rejected" may also be a string
or a list of messages. A record of the wrong shape (no chosen/rejected, an unknown role, a turn that
is not an object) is refused here, naming the file and the record's index. Accepts part/num_parts.
"""

import json
from pathlib import Path

from encoder.plugins import part_bounds

ROLE_MAP = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
            "assistant": "assistant"}
RECORD_HELP = ("each record needs 'conversations' (the prompt turns, [{'from': 'human', "
               "'value': ...}, ...]) plus 'chosen' and 'rejected' ({'from': 'gpt', 'value': ...})")


def _message(turn: object, what: str) -> dict:
    if not isinstance(turn, dict):
        raise ValueError(f"{what} must be an object {{'from', 'value'}}, got "
                         f"{type(turn).__name__}")
    role = turn.get("from", turn.get("role"))
    if role not in ROLE_MAP:
        raise ValueError(f"{what}: unknown ShareGPT role {role!r}; known: {sorted(ROLE_MAP)}")
    return {"role": ROLE_MAP[role], "content": turn.get("value", turn.get("content"))}


def _response(value: object, key: str) -> object:
    """'chosen'/'rejected': a message object (ShareGPT spelling mapped), a string, or a list of
    message objects."""
    if isinstance(value, dict):
        return _message(value, repr(key))
    if isinstance(value, list):
        return [_message(m, f"{key!r}[{j}]") for j, m in enumerate(value)]
    if isinstance(value, str):
        return value
    raise ValueError(f"{key!r} must be a message object {{'from': 'gpt', 'value': ...}} (or a "
                     f"string, or a list of messages), got {type(value).__name__}")


def to_pair(record: object, *, where: str = "record") -> dict:
    """One LLaMA-Factory preference record -> a preference row; ValueError naming `where` (the
    file and record index) on a record of the wrong shape."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object, got {type(record).__name__}; "
                         f"{RECORD_HELP}")
    missing = [k for k in ("chosen", "rejected") if record.get(k) is None]
    if "conversations" not in record and "messages" not in record:
        missing.insert(0, "conversations")
    if missing:
        raise ValueError(f"{where}: missing {', '.join(map(repr, missing))} (keys "
                         f"{sorted(record)}); {RECORD_HELP}")
    turns = record["conversations"] if "conversations" in record else record["messages"]
    try:
        if not isinstance(turns, list):
            raise ValueError(f"'conversations' must be a list of turns, got "
                             f"{type(turns).__name__}")
        messages = [{"role": "system", "content": record["system"]}] if record.get("system") \
            else []
        messages += [_message(t, f"'conversations'[{j}]") for j, t in enumerate(turns)]
        out = {"messages": messages}
        for key in ("chosen", "rejected"):
            out[key] = _response(record[key], key)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return out


def data_loader(path, part=None, num_parts=None):
    records = [(one, k, r) for one in str(path).split(",")
               for k, r in enumerate(json.loads(Path(one).read_text(encoding="utf-8")))]
    if part is not None:
        start, stop = part_bounds(int(part), int(num_parts), len(records))
        records = records[start:stop]
    for file, k, record in records:
        yield to_pair(record, where=f"{file}: record {k}")
