"""The byte layouts: the only place in the project that knows them.

Two formats: our shards (below), and Megatron-LM's `MMIDIDX` indexed datasets (second half of
this module), which we read as pretrain data and write for Megatron users.

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
                                                   earlier sample (pretrain chunking); bit 1
                                                   (kto datasets only): the example is undesirable

The file size is exactly `index_nbytes(S, D, L)`, so a truncated or padded index is caught from its
header alone, before any array is touched, and no count can make the reader map more than the file.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from shardfmt.errors import CorruptShardError

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
DOC_FLAG_UNDESIRABLE = 2  # bit 1 of doc_flags, kto datasets only: the example's label is False

# The arrays after the header, in file order: name -> (little-endian dtype, elements per row).
# index_array_offsets, index_nbytes, the reader and the writer all take them from here.
INDEX_ARRAYS: dict[str, tuple[str, int]] = {
    "sample_offsets": ("<i8", 3),   # rows (tokens, docs, spans), S + 1 of them
    "doc_lens": ("<i4", 1),         # D
    "loss_spans": ("<i4", 2),       # L rows (start, end)
    "doc_flags": ("<u1", 1),        # D
}
OFFSET_ROW_NBYTES = 3 * 8                 # one sample_offsets row
OFFSET_ROW_PAIR = struct.Struct("<6q")    # rows j and j+1: sample j's bounds in one read
assert OFFSET_ROW_PAIR.size == 2 * OFFSET_ROW_NBYTES


def token_dtype(dtype: str | np.dtype) -> np.dtype:
    """The on-disk (little-endian) dtype of the tokens in a `.bin` (both formats)."""
    return np.dtype(dtype).newbyteorder("<")


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
        raise CorruptShardError(f"{path}: index is {len(raw)} bytes, shorter than the {HEADER.size}-byte "
                         f"header (truncated file?)")
    magic, version, code, s, d, l, t = HEADER.unpack_from(raw)
    if magic != MAGIC:
        hint = (" It is a Megatron MMIDIDX index: pass its prefix (the path without .idx)."
                if raw.startswith(MEGATRON_MAGIC) else "")
        raise CorruptShardError(f"{path}: bad magic {magic!r} (expected {MAGIC!r}); not a "
                                f"shardfmt index.{hint}")
    if version != FORMAT_VERSION:
        raise CorruptShardError(f"{path}: format version {version}; this reader knows version "
                                f"{FORMAT_VERSION}. Upgrade shardfmt or re-encode.")
    if code not in CODE_TO_DTYPE or CODE_TO_DTYPE[code] not in WRITABLE_DTYPES:
        raise CorruptShardError(f"{path}: unknown token dtype code {code} (valid: "
                                f"{[DTYPE_CODES[n] for n in WRITABLE_DTYPES]}); the file is corrupt")
    return IndexHeader(version, CODE_TO_DTYPE[code], s, d, l, t)


def _index_rows(num_samples: int, num_docs: int, num_spans: int) -> dict[str, int]:
    return {"sample_offsets": num_samples + 1, "doc_lens": num_docs, "loss_spans": num_spans,
            "doc_flags": num_docs}


def index_nbytes(num_samples: int, num_docs: int, num_spans: int) -> int:
    """Exact `.idx` size for the given counts (see the layout table above)."""
    rows = _index_rows(num_samples, num_docs, num_spans)
    return HEADER.size + sum(rows[name] * per_row * np.dtype(dt).itemsize
                             for name, (dt, per_row) in INDEX_ARRAYS.items())


def index_array_offsets(h: IndexHeader) -> dict[str, tuple[int, int, str]]:
    """Byte offset, element count and numpy dtype of every array in the index."""
    rows = _index_rows(h.num_samples, h.num_docs, h.num_spans)
    out, pos = {}, HEADER.size
    for name, (dt, per_row) in INDEX_ARRAYS.items():
        count = rows[name] * per_row
        out[name] = (pos, count, dt)
        pos += count * np.dtype(dt).itemsize
    return out


def shard_file_names(corpus_name: str, shard_index: int) -> tuple[str, str]:
    """`("c_00003.bin", "c_00003.idx")` for corpus "c", shard 3."""
    stem = f"{corpus_name}_{shard_index:05d}"
    return stem + ".bin", stem + ".idx"


# ----------------------------------------------------------------------------------------------
# Megatron-LM `MMIDIDX` (megatron/core/datasets/indexed_dataset.py), a pair PREFIX.bin / PREFIX.idx
#
#   PREFIX.bin  token ids of every sequence back to back (one dtype, no header)
#   PREFIX.idx  (little-endian, packed, no alignment padding)
#     offset        size      field
#     0             9         magic b"MMIDIDX\x00\x00"
#     9             8  <Q     version, always 1
#     17            1  <B     dtype code (DTYPE_CODES above; 6 float64 / 7 float32 are not tokens)
#     18            8  <Q     S  sequence count
#     26            8  <Q     D  document-index count (documents + 1: the list starts with 0)
#     34            4*S <i4   sequence_lengths   tokens per sequence
#     34+4S         8*S <i8   sequence_pointers  BYTE offset of each sequence in .bin
#     34+12S        8*D <i8   document_indices   0, then the sequence index where each document ends
#     34+12S+8D     1*S <i1   sequence_modes     multimodal datasets only (not flagged in the
#                                                header; refused: not token data)
# ----------------------------------------------------------------------------------------------
MEGATRON_MAGIC = b"MMIDIDX\x00\x00"
MEGATRON_VERSION = 1
MEGATRON_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, S, D
assert MEGATRON_HEADER.size == 34
MEGATRON_FLOAT_CODES = {6: "float64", 7: "float32"}
# The arrays after the header, in file order: name -> little-endian dtype.
MEGATRON_ARRAYS: dict[str, str] = {
    "sequence_lengths": "<i4",    # S
    "sequence_pointers": "<i8",   # S, byte offsets into .bin
    "document_indices": "<i8",    # D
}


@dataclass(frozen=True)
class MegatronHeader:
    dtype: str               # token dtype of .bin (little-endian)
    num_sequences: int       # S
    num_doc_indices: int     # D = documents + 1


def megatron_index_nbytes(num_sequences: int, num_doc_indices: int) -> int:
    """Exact size of a text (non-multimodal) `.idx` with these header counts."""
    sizes = {name: np.dtype(dt).itemsize for name, dt in MEGATRON_ARRAYS.items()}
    return (MEGATRON_HEADER.size
            + (sizes["sequence_lengths"] + sizes["sequence_pointers"]) * num_sequences
            + sizes["document_indices"] * num_doc_indices)


def pack_megatron_header(dtype: str, num_sequences: int, num_doc_indices: int) -> bytes:
    return MEGATRON_HEADER.pack(MEGATRON_MAGIC, MEGATRON_VERSION, DTYPE_CODES[dtype],
                                num_sequences, num_doc_indices)


def unpack_megatron_header(raw: bytes, *, path: str, file_size: int) -> MegatronHeader:
    """Parse the 34-byte header and check it against the `.idx` size; every error names `path`."""
    if len(raw) < MEGATRON_HEADER.size:
        raise CorruptShardError(f"{path}: {len(raw)} bytes, shorter than the "
                                f"{MEGATRON_HEADER.size}-byte MMIDIDX header (truncated file?)")
    magic, version, code, num_seqs, num_doc_idx = MEGATRON_HEADER.unpack_from(raw)
    if magic != MEGATRON_MAGIC:
        raise CorruptShardError(f"{path}: bad magic {magic!r} (expected {MEGATRON_MAGIC!r}); not a "
                                f"Megatron MMIDIDX index")
    if version != MEGATRON_VERSION:
        raise CorruptShardError(f"{path}: MMIDIDX version {version}, only version "
                                f"{MEGATRON_VERSION} exists")
    if code in MEGATRON_FLOAT_CODES:
        raise CorruptShardError(f"{path}: dtype code {code} ({MEGATRON_FLOAT_CODES[code]}) holds "
                                f"floats, not token ids")
    if code not in CODE_TO_DTYPE:
        raise CorruptShardError(f"{path}: unknown dtype code {code}")
    want = megatron_index_nbytes(num_seqs, num_doc_idx)
    if file_size != want:
        hint = ("; that is exactly one extra byte per sequence: a multimodal index with sequence "
                "modes, which is not token data") if (file_size == want + num_seqs and num_seqs) \
            else " (truncated, padded, or the header counts are corrupt)"
        raise CorruptShardError(f"{path}: {file_size} bytes, but the header's {num_seqs} sequences "
                                f"and {num_doc_idx} document indices need {want}{hint}")
    if num_doc_idx < 1:
        raise CorruptShardError(f"{path}: document index count is 0; Megatron indices always "
                                f"start with a 0 entry")
    return MegatronHeader(CODE_TO_DTYPE[code], int(num_seqs), int(num_doc_idx))


def megatron_array_offsets(h: MegatronHeader) -> dict[str, tuple[int, int, str]]:
    """Byte offset, element count and numpy dtype of every array of a Megatron `.idx`."""
    counts = {"sequence_lengths": h.num_sequences, "sequence_pointers": h.num_sequences,
              "document_indices": h.num_doc_indices}
    out, pos = {}, MEGATRON_HEADER.size
    for name, dt in MEGATRON_ARRAYS.items():
        out[name] = (pos, counts[name], dt)
        pos += counts[name] * np.dtype(dt).itemsize
    return out


def is_megatron_index(path: str) -> bool:
    """True if the file at `path` starts with the MMIDIDX magic (reads 9 bytes)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MEGATRON_MAGIC)) == MEGATRON_MAGIC
    except OSError:
        return False
