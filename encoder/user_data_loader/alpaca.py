"""Alpaca JSON plugin (qa): instruction + input form the prompt, output is the answer.

    llm-encode --encode_type qa --data_loader_path encoder/user_data_loader/alpaca.py \
        --data_loader_args path=../shared/data/alpaca_en_demo.json ...

A record's optional "system" is passed on. `path` may list several files, comma-separated.
Accepts part/num_parts (contiguous slice of records).
"""

import json
from pathlib import Path

DEFAULT_PATH = Path(__file__).with_name("sample_alpaca.json")


def to_qa(record: dict) -> dict:
    """`{"instruction": "Add", "input": "2+2", "output": "4"}` -> `{"q": "Add\\n\\n2+2", "a": "4"}`."""
    prompt = record["instruction"]
    if record.get("input"):
        prompt = f"{prompt}\n\n{record['input']}"
    row = {"q": prompt, "a": record["output"]}
    if record.get("system"):
        row["system"] = record["system"]
    return row


def data_loader(path=str(DEFAULT_PATH), part=None, num_parts=None):
    records = [r for one in str(path).split(",")
               for r in json.loads(Path(one).read_text(encoding="utf-8"))]
    if part is not None:
        n = len(records)
        records = records[int(part) * n // int(num_parts):(int(part) + 1) * n // int(num_parts)]
    for record in records:
        yield to_qa(record)
