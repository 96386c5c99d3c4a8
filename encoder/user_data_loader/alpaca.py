"""Alpaca JSON plugin (qa): instruction + input form the prompt, output is the answer.

    llm-encode --encode_type qa --data_loader_path encoder/user_data_loader/alpaca.py \
        --data_loader_args path=../shared/data/alpaca_en_demo.json ...

A record's optional "system" is passed on. `path`: JSON arrays or JSON Lines (`.jsonl`) files,
comma-separated, globs and s3:// / gs:// URLs. Part-aware (part_index/num_parts): `.jsonl` input is
cut by bytes, so part k reads ~1/N of it; JSON arrays are parsed whole and sliced by record.
"""

from pathlib import Path

from encoder.input_files import expand_paths, json_records_of_part

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


def data_loader(path=str(DEFAULT_PATH), part_index=None, num_parts=None):
    for record in json_records_of_part(expand_paths(str(path)), part_index, num_parts):
        yield to_qa(record)
