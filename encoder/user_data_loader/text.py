"""Plain-text / JSONL plugin (pretrain): yields one str per document.

    --data_loader_args path=../shared/data/c4_demo.jsonl            # JSONL: the "text" field
    --data_loader_args path=../shared/data/wiki_demo.txt split=line # one document per line
    --data_loader_args path=book.txt split=file                     # the whole file is one document
    --data_loader_args "path=s3://bucket/c4/*.jsonl"                # URLs and globs (fsspec)

Arguments: path (.jsonl/.json lines or text; comma-separated for several files; globs; s3:// gs://
URLs), split for text files: paragraph (default; paragraphs are separated by empty lines), line,
or file; text_key for JSONL (default text). Lines end with \\n or \\r\\n. Blank documents are
skipped here (the encoder would reject empty rows).

Part-aware: with part_index/num_parts (given by `--part`), JSONL and line/paragraph text are cut by
bytes (encoder/input_files.py), so part k reads about 1/N of the input; split=file gives each part
a contiguous slice of the files.
"""

from pathlib import Path

from encoder.input_files import (byte_ranges_of_part, expand_paths, file_size, files_of_part,
                                 json_line, lines_in_range, open_binary, read_bytes,
                                 seek_line_start)

DEFAULT_PATH = Path(__file__).with_name("sample_text.txt")
SPLITS = ("paragraph", "line", "file")


def _is_jsonl(path: str) -> bool:
    return path.endswith((".jsonl", ".json"))


def _line_text(line: bytes) -> str:
    return line.decode("utf-8").removesuffix("\n").removesuffix("\r")


def _empty(line: bytes) -> bool:
    return line in (b"\n", b"\r\n")


def _previous_line_empty(f, line_start: int) -> bool:
    """Is the line before the one at `line_start` empty (so a paragraph starts at `line_start`)?"""
    if line_start == 0:
        return True
    f.seek(max(line_start - 3, 0))
    tail = f.read(line_start - max(line_start - 3, 0))
    return tail.endswith((b"\n\n", b"\n\r\n")) or tail in (b"\n", b"\r\n")


def _paragraphs_in_range(f, start: int, stop: int):
    """Paragraphs (lists of lines) whose first line starts in [start, stop); the last one is read
    to its end even past `stop`."""
    pos = seek_line_start(f, start)
    foreign = not _previous_line_empty(f, pos)   # inside a paragraph of an earlier part
    f.seek(pos)
    para: list[bytes] = []
    for line in iter(f.readline, b""):
        if _empty(line):
            if para:
                yield para
                para = []
            foreign = False
        elif not foreign:
            para.append(line)
        pos += len(line)
        if not para and pos >= stop:
            return
    if para:
        yield para


def data_loader(path=str(DEFAULT_PATH), split="paragraph", text_key="text", part_index=None,
                num_parts=None):
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: choose paragraph, line or file")
    paths = expand_paths(str(path))
    if split == "file":   # whole files: a contiguous slice of the list per part
        for one in files_of_part(paths, part_index, num_parts):
            text = read_bytes(one).decode("utf-8").replace("\r\n", "\n").strip("\n")
            if text.strip():
                yield text
        return
    sizes = [file_size(p) for p in paths]
    for k, start, stop in byte_ranges_of_part(sizes, part_index, num_parts):
        with open_binary(paths[k]) as f:
            yield from _docs_in_range(f, paths[k], start, stop, split=split, text_key=text_key)


def _docs_in_range(f, path: str, start: int, stop: int, *, split: str, text_key: str):
    if _is_jsonl(path):
        for offset, line in lines_in_range(f, start, stop):
            if line.strip():
                yield json_line(path, offset, line)[text_key]
    elif split == "line":
        for _, line in lines_in_range(f, start, stop):
            text = _line_text(line)
            if text.strip():
                yield text
    else:
        for para in _paragraphs_in_range(f, start, stop):
            text = b"".join(para).decode("utf-8").replace("\r\n", "\n").strip("\n")
            if text.strip():
                yield text
