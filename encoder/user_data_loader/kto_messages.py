"""Unpaired-feedback (KTO) plugin for LLaMA-Factory's kto_en_demo.json and files like it:
{"messages": [{"role": "user"|"assistant"|"system", "content"}, ...], "label": true|false}
(ShareGPT spellings "conversations"/"from"/"value" and a "kto_tag" label are accepted too, as in
LLaMA-Factory's dataset_info.json) -> {"messages", "label"} rows for --encode_type kto: the last
assistant message is the completion, the turns before it the prompt.

    python encoder/main.py --encode_type kto --template chatml --data_loader_path \
        encoder/user_data_loader/kto_messages.py \
        --data_loader_args path=../shared/data/kto_en_demo.json ...

A record without a boolean label is refused here, naming the file and the record's index, rather
than guessed from truthiness. Accepts part/num_parts.
"""

import json
from pathlib import Path

from encoder.plugins import part_bounds

ROLE_MAP = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
            "assistant": "assistant"}


def _message(turn: dict) -> dict:
    role = turn.get("role", turn.get("from"))
    if role not in ROLE_MAP:
        raise ValueError(f"unknown role {role!r}; known: {sorted(ROLE_MAP)}")
    return {"role": ROLE_MAP[role], "content": turn.get("content", turn.get("value"))}


def to_row(record: dict, *, where: str) -> dict:
    """One LLaMA-Factory KTO record -> a kto row; ValueError naming `where` on a bad label."""
    label = record.get("label", record.get("kto_tag"))
    if not isinstance(label, bool):
        raise ValueError(f"{where}: 'label' must be a JSON boolean (true = desirable, false = "
                         f"undesirable), got {label!r} (keys {sorted(record)}); fix the record, "
                         f"or map your rating to true/false in a plugin of your own")
    turns = record.get("messages") or record.get("conversations") or []
    messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    try:
        messages += [_message(t) for t in turns]
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return {"messages": messages, "label": label}


def data_loader(path, part=None, num_parts=None):
    records = [(one, k, r) for one in str(path).split(",")
               for k, r in enumerate(json.loads(Path(one).read_text(encoding="utf-8")))]
    if part is not None:
        start, stop = part_bounds(int(part), int(num_parts), len(records))
        records = records[start:stop]
    for file, k, record in records:
        yield to_row(record, where=f"{file}: record {k}")
