"""ShareGPT multi-turn plugin (chat): {"conversations": [{"from": "human"|"gpt"|"system", "value"}]}.

    llm-encode --encode_type chat --data_loader_path encoder/user_data_loader/sharegpt.py \
        --data_loader_args path=../shared/data/fastchat_dummy_conversation.json ...

Roles: system -> system, human/user -> user, gpt/assistant -> assistant; tool-calling data maps
function_call -> assistant and observation -> user. A record-level "system" string is used as the
system message. Unknown roles raise (the encoder names the row). Accepts part/num_parts.
"""

import json
from pathlib import Path

DEFAULT_PATH = Path(__file__).with_name("sample_sharegpt.json")
ROLE_MAP = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
            "assistant": "assistant", "function_call": "assistant", "observation": "user"}


def to_messages(record: dict) -> dict:
    """One ShareGPT record -> `{"messages": [...]}`."""
    turns = record.get("conversations") or record.get("messages") or []
    messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    for turn in turns:
        role = turn.get("from", turn.get("role"))
        if role not in ROLE_MAP:
            raise ValueError(f"unknown ShareGPT role {role!r}; known: {sorted(ROLE_MAP)}")
        messages.append({"role": ROLE_MAP[role], "content": turn.get("value", turn.get("content"))})
    return {"messages": messages}


def data_loader(path=str(DEFAULT_PATH), part=None, num_parts=None):
    records = [r for one in str(path).split(",")
               for r in json.loads(Path(one).read_text(encoding="utf-8"))]
    if part is not None:
        n = len(records)
        records = records[int(part) * n // int(num_parts):(int(part) + 1) * n // int(num_parts)]
    for record in records:
        yield to_messages(record)
