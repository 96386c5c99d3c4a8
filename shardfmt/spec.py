"""The byte layout of one shard's `.idx` file: the only place in the project that knows it.

A shard is a pair of files:
  NAME.bin  raw token ids, little-endian, one dtype, samples back to back (no header, no padding).
  NAME.idx  the index below. Every offset is in *tokens* (elements), not bytes.

`.idx` layout (little-endian; arrays follow the header in this order, no gaps):

  offset  size              field
  0       8                 magic  b"SHRDIDX\\x00"
  8       4   <u4           format version (FORMAT_VERSION)
  12      1   <u1           dtype code (DTYPE_CODES; Megatron's numbering)
  13      3                 zero padding (keeps the counts 8-byte aligned)
  16      8   <u8           S  sample count
  24      8   <u8           D  document-segment count (all samples)
  32      8   <u8           L  loss-span count (all samples)
  40      8   <u8           T  token count (= elements in .bin)
  48      24*(S+1) <i8[3]   sample_offsets         row i = (t[i], d[i], s[i]): sample i is
                                                   bin[t[i]:t[i+1]], its segments doc_lens[d[i]:d[i+1]],
                                                   its loss spans spans[s[i]:s[i+1]]; row 0 = (0,0,0),
                                                   row S = (T, D, L). Interleaved so that one random
                                                   read touches one cache line, not three.
  ...     4*D     <i4       doc_lens               token count of each document segment
  ...     8*L     <i4,<i4   loss_spans             (start, end) pairs, end exclusive, relative to the
                                                   sample's first token, sorted, non-overlapping
  ...     1*D     <u1       doc_flags              bit 0: segment continues a document begun in an
                                                   earlier sample (pretrain chunking)

The file size is exactly `index_nbytes(S, D, L)`, so a truncated or padded index is caught from its
header alone, before any array is touched, and no count can make the reader map more than the file.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

MAGIC = b"SHRDIDX\x00"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "shardfmt-manifest"

# Megatron's dtype codes, so both formats share one table. Only the token dtypes we write are allowed.
DTYPE_CODES: dict[str, int] = {"uint8": 1, "int8": 2, "int16": 3, "int32": 4, "int64": 5, "uint16": 8}
CODE_TO_DTYPE: dict[int, str] = {code: name for name, code in DTYPE_CODES.items()}
WRITABLE_DTYPES = ("uint16", "int16", "int32")

HEADER = struct.Struct("<8sIB3xQQQQ")  # magic, version, dtype code, pad, S, D, L, T
assert HEADER.size == 48

DOC_FLAG_CONTINUES = 1  # bit 0 of doc_flags


@dataclass(frozen=True)
class IndexHeader:
    version: int
    dtype: str
    num_samples: int
    num_docs: int
    num_spans: int
    num_tokens: int


def dtype_max_id(dtype: str) -> int:
    """Largest token id `dtype` holds: `dtype_max_id("int16") == 32767`."""
    return int(np.iinfo(np.dtype(dtype)).max)


def smallest_dtype_for(vocab_size: int) -> str:
    """Smallest writable dtype holding ids 0..vocab_size-1: 50257 -> "uint16", 151669 -> "int32"."""
    for name in ("uint16", "int32"):
        if vocab_size - 1 <= dtype_max_id(name):
            return name
    raise ValueError(f"vocab size {vocab_size} does not fit int32; no writable dtype holds it")


def pack_header(h: IndexHeader) -> bytes:
    return HEADER.pack(MAGIC, h.version, DTYPE_CODES[h.dtype], h.num_samples, h.num_docs,
                       h.num_spans, h.num_tokens)


def unpack_header(raw: bytes, *, path: str) -> IndexHeader:
    """Parse and sanity-check the 48-byte header; every error names `path`."""
    if len(raw) < HEADER.size:
        raise ValueError(f"{path}: index is {len(raw)} bytes, shorter than the {HEADER.size}-byte "
                         f"header (truncated file?)")
    magic, version, code, s, d, l, t = HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise ValueError(f"{path}: bad magic {magic!r} (expected {MAGIC!r}); not a shardfmt index. "
                         f"For a Megatron MMIDIDX prefix use shardfmt.open_megatron.")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: format version {version}; this reader knows version "
                         f"{FORMAT_VERSION}. Upgrade shardfmt or re-encode.")
    if code not in CODE_TO_DTYPE or CODE_TO_DTYPE[code] not in WRITABLE_DTYPES:
        raise ValueError(f"{path}: unknown token dtype code {code}")
    return IndexHeader(version, CODE_TO_DTYPE[code], s, d, l, t)


def index_nbytes(num_samples: int, num_docs: int, num_spans: int) -> int:
    """Exact `.idx` size for the given counts (see the layout table above)."""
    return HEADER.size + 3 * 8 * (num_samples + 1) + 4 * num_docs + 8 * num_spans + num_docs


def index_array_offsets(h: IndexHeader) -> dict[str, tuple[int, int, str]]:
    """Byte offset, element count and numpy dtype of every array in the index."""
    s1 = h.num_samples + 1
    layout = [
        ("sample_offsets", 3 * s1, "<i8"),
        ("doc_lens", h.num_docs, "<i4"),
        ("loss_spans", 2 * h.num_spans, "<i4"),
        ("doc_flags", h.num_docs, "<u1"),
    ]
    out, pos = {}, HEADER.size
    for name, count, dt in layout:
        out[name] = (pos, count, dt)
        pos += count * np.dtype(dt).itemsize
    return out


def shard_file_names(corpus_name: str, shard_index: int) -> tuple[str, str]:
    """`("c_00003.bin", "c_00003.idx")` for corpus "c", shard 3."""
    stem = f"{corpus_name}_{shard_index:05d}"
    return stem + ".bin", stem + ".idx"
