"""ShareGPT multi-turn plugin (chat): {"conversations": [{"from": "human"|"gpt"|"system", "value"}]}.

    llm-encode --encode_type chat --data_loader_path encoder/user_data_loader/sharegpt.py \
        --data_loader_args path=../shared/data/fastchat_dummy_conversation.json ...

Roles: system -> system, human/user -> user, gpt/assistant -> assistant; tool-calling data maps
function_call -> assistant and observation -> user. A record-level "system" string is used as the
system message. Unknown roles raise (the encoder names the row). `path`: JSON arrays or JSON Lines
(`.jsonl`), comma-separated, globs and s3:// / gs:// URLs. Part-aware (part_index/num_parts):
`.jsonl` input is cut by bytes (part k reads ~1/N); JSON arrays are parsed whole, sliced by record.
"""

from pathlib import Path

from encoder.input_files import expand_paths, json_records_of_part

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


def data_loader(path=str(DEFAULT_PATH), part_index=None, num_parts=None):
    for record in json_records_of_part(expand_paths(str(path)), part_index, num_parts):
        yield to_messages(record)
