"""Plain-text / JSONL plugin (pretrain): yields one str per document.

    --data_loader_args path=../shared/data/c4_demo.jsonl            # JSONL: the "text" field
    --data_loader_args path=../shared/data/wiki_demo.txt split=line # one document per line
    --data_loader_args path=book.txt split=file                     # the whole file is one document

Arguments: path (.jsonl/.json lines or text; comma-separated for several files), split for text
files: paragraph (default; blank-line separated), line, or file; text_key for JSONL (default text).
Blank documents are skipped here (the encoder would reject empty rows).
"""

import json
from pathlib import Path

DEFAULT_PATH = Path(__file__).with_name("sample_text.txt")


def _jsonl_docs(path: Path, text_key: str):
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)[text_key]


def _text_docs(path: Path, split: str):
    text = path.read_text(encoding="utf-8")
    if split == "file":
        pieces = [text]
    elif split == "line":
        pieces = text.splitlines()
    elif split == "paragraph":
        pieces = text.split("\n\n")
    else:
        raise ValueError(f"split={split!r}: choose paragraph, line or file")
    for piece in pieces:
        if piece.strip():
            yield piece.strip("\n")


def data_loader(path=str(DEFAULT_PATH), split="paragraph", text_key="text"):
    for one in str(path).split(","):
        p = Path(one)
        if p.suffix in (".jsonl", ".json"):
            yield from _jsonl_docs(p, text_key)
        else:
            yield from _text_docs(p, split)
