"""Input files for plugins: local paths or URLs (`s3://`, `gs://`, any fsspec protocol), and the
part of them that one `--part I/N` reads.

A part-aware plugin takes `part_index` and `num_parts` keyword arguments (the encoder passes them
with `--part`, `python -m encoder.distributed` and Slurm array tasks) and yields only its part, so
part k of N reads about 1/N of the input instead of scanning it all:

    from encoder.input_files import expand_paths, lines_of_part

    def data_loader(path, part_index=None, num_parts=None):
        for _path, _offset, line in lines_of_part(expand_paths(path), part_index, num_parts):
            yield json.loads(line)["text"]

Line files (JSONL, text) are cut by bytes: the files' total size S is split with
`encoder.plugins.part_bounds` into N ranges and a part yields the lines that *start* in its range
(a line crossing a boundary belongs to the part where it starts), so the parts joined in order
give every line once, in the same order as one unpartitioned run. Reading costs one `stat` per
file plus the part's own bytes (and one partial line before the range, to find a line start).

Remote paths go through fsspec (`pip install "llm-shards[distributed]"` adds fsspec, s3fs and
gcsfs). Credentials and endpoints come from the usual places (AWS_* variables / ~/.aws for S3,
AWS_ENDPOINT_URL for an S3-compatible store, GOOGLE_APPLICATION_CREDENTIALS for GCS).
"""

from __future__ import annotations

import glob
import io
import json
import os
from typing import IO, Any, Iterator, Sequence

from encoder.plugins import part_bounds

GLOB_CHARS = "*?["


def is_url(path: str) -> bool:
    """True for `s3://bucket/x`, `gs://...`, `memory://...`; False for local paths."""
    return "://" in path


def _filesystem(path: str) -> tuple[Any, str]:
    try:
        import fsspec
    except ImportError:
        raise ImportError(f"{path}: reading URLs needs fsspec (and s3fs for s3://, gcsfs for "
                          f"gs://): pip install \"llm-shards[distributed]\"") from None
    try:
        return fsspec.core.url_to_fs(path)
    except ImportError as e:  # fsspec names the missing backend package
        raise ImportError(f"{path}: {e} (pip install \"llm-shards[distributed]\")") from None
    except ValueError as e:   # "Protocol not known"
        raise ValueError(f"{path}: {e}; use a local path or a URL fsspec knows (s3://, gs://, "
                         f"https://, ...)") from None


def expand_paths(spec: str | Sequence[str]) -> list[str]:
    """Comma-separated paths/URLs, each possibly a glob, -> the list of files, globs sorted.

    Raises FileNotFoundError naming a path or pattern that matches nothing.
    """
    items = [s for s in (spec.split(",") if isinstance(spec, str) else spec) if s]
    out: list[str] = []
    for item in items:
        if not any(c in item for c in GLOB_CHARS):
            out.append(item)
            continue
        if is_url(item):
            fs, _ = _filesystem(item)
            protocol = item.split("://", 1)[0]
            matches = [m if is_url(m) else f"{protocol}://{m}" for m in sorted(fs.glob(item))]
        else:
            matches = sorted(glob.glob(item))
        if not matches:
            raise FileNotFoundError(f"path={item!r}: the pattern matches no file")
        out.extend(matches)
    if not out:
        raise FileNotFoundError("path is empty: give a file, a comma-separated list or a glob")
    return out


def open_binary(path: str) -> IO[bytes]:
    """A seekable binary file object for a local path or a URL."""
    if is_url(path):
        fs, p = _filesystem(path)
        return fs.open(p, "rb")
    return open(path, "rb")


def file_size(path: str) -> int:
    if is_url(path):
        fs, p = _filesystem(path)
        return int(fs.size(p))
    return os.path.getsize(path)


def read_bytes(path: str) -> bytes:
    with open_binary(path) as f:
        return f.read()


def _check_part(part_index: int | None, num_parts: int | None) -> tuple[int, int]:
    """(0, 1) for "no part"; else the ints, checked (plugins receive them as given)."""
    if part_index is None and num_parts is None:
        return 0, 1
    if part_index is None or num_parts is None:
        raise ValueError(f"part_index={part_index!r}, num_parts={num_parts!r}: give both or neither")
    i, n = int(part_index), int(num_parts)
    if not 0 <= i < n:
        raise ValueError(f"part_index={i}, num_parts={n}: need 0 <= part_index < num_parts")
    return i, n


def byte_ranges_of_part(sizes: Sequence[int], part_index: int | None,
                        num_parts: int | None) -> list[tuple[int, int, int]]:
    """`(file_number, start, stop)` byte ranges of part `part_index` of `num_parts` over files of
    `sizes` bytes taken as one concatenated stream (so a part's share does not depend on how the
    corpus is split into files).

    >>> byte_ranges_of_part([10, 30], 0, 2), byte_ranges_of_part([10, 30], 1, 2)
    ([(0, 0, 10), (1, 0, 10)], [(1, 10, 30)])
    """
    i, n = _check_part(part_index, num_parts)
    lo, hi = part_bounds(i, n, sum(sizes))
    out, base = [], 0
    for k, size in enumerate(sizes):
        a, b = max(lo - base, 0), min(hi - base, size)
        if a < b:
            out.append((k, a, b))
        base += size
    return out


def seek_line_start(f: IO[bytes], start: int) -> int:
    """Move `f` to the first line that starts at or after byte `start`; returns that offset.
    A line that starts before `start` belongs to an earlier range (it is skipped)."""
    if start <= 0:
        f.seek(0)
        return 0
    f.seek(start - 1)
    return start - 1 + len(f.readline())  # just b"\n" when a line starts exactly at `start`


def lines_in_range(f: IO[bytes], start: int, stop: int) -> Iterator[tuple[int, bytes]]:
    """`(offset, line)` for every line of `f` whose first byte is in [start, stop); each line
    keeps its end of line. The last one may end after `stop`."""
    pos = seek_line_start(f, start)
    while pos < stop:
        line = f.readline()
        if not line:
            return
        yield pos, line
        pos += len(line)


def lines_of_part(paths: Sequence[str], part_index: int | None = None,
                  num_parts: int | None = None) -> Iterator[tuple[str, int, bytes]]:
    """`(path, byte_offset, line)` of the lines of this part, over all `paths` in order."""
    paths = list(paths)
    sizes = [file_size(p) for p in paths] if _check_part(part_index, num_parts)[1] > 1 else None
    if sizes is None:  # one part: the whole of every file, no stat needed
        ranges = [(k, 0, float("inf")) for k in range(len(paths))]
    else:
        ranges = byte_ranges_of_part(sizes, part_index, num_parts)
    for k, start, stop in ranges:
        with open_binary(paths[k]) as f:
            for offset, line in lines_in_range(f, start, stop):
                yield paths[k], offset, line


def files_of_part(paths: Sequence[str], part_index: int | None = None,
                  num_parts: int | None = None) -> list[str]:
    """Whole files for data that cannot be cut by bytes: a contiguous slice of the file list
    (`part_bounds` over the number of files)."""
    i, n = _check_part(part_index, num_parts)
    lo, hi = part_bounds(i, n, len(paths))
    return list(paths[lo:hi])


def json_line(path: str, offset: int, line: bytes) -> Any:
    """One JSON Lines record; a parse error names the file and the byte offset of the line."""
    try:
        return json.loads(line)
    except ValueError as e:
        raise ValueError(f"{path}: line at byte {offset}: not valid JSON ({e})") from None


def json_records_of_part(paths: Sequence[str], part_index: int | None = None,
                         num_parts: int | None = None) -> Iterator[dict]:
    """Records of JSON files (each a JSON array of objects) or JSON Lines files (`.jsonl`).

    All `.jsonl`: cut by bytes (`lines_of_part`), part k reads ~1/N. Otherwise the arrays must
    be parsed whole, so every part loads all records and keeps its contiguous slice (`part_bounds`
    over the record count): convert large JSON arrays to JSONL to read only a part.
    """
    paths = list(paths)
    if all(p.endswith(".jsonl") for p in paths):
        for path, offset, line in lines_of_part(paths, part_index, num_parts):
            if line.strip():
                yield json_line(path, offset, line)
        return
    records: list = []
    for path in paths:
        data = read_bytes(path)
        if path.endswith(".jsonl"):
            records += [json_line(path, off, ln) for off, ln in _offset_lines(data) if ln.strip()]
            continue
        try:
            loaded = json.loads(data)
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); JSON Lines files must end in "
                             f".jsonl") from None
        if not isinstance(loaded, list):
            raise ValueError(f"{path}: expected a JSON array of records, got "
                             f"{type(loaded).__name__}")
        records += loaded
    i, n = _check_part(part_index, num_parts)
    lo, hi = part_bounds(i, n, len(records))
    yield from records[lo:hi]


def _offset_lines(data: bytes) -> Iterator[tuple[int, bytes]]:
    pos = 0
    for line in io.BytesIO(data):
        yield pos, line
        pos += len(line)
