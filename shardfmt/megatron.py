"""Megatron-LM `MMIDIDX` indexed datasets: read them as pretrain data, export our datasets to them.

numpy only: Megatron (megatron.core.datasets.indexed_dataset) is needed by the interop tests, never
here. A Megatron dataset is a pair PREFIX.bin / PREFIX.idx:

  PREFIX.bin  token ids of every sequence back to back (one dtype, no header)
  PREFIX.idx  (little-endian, packed, no alignment padding)
    offset        size      field
    0             9         magic b"MMIDIDX\\x00\\x00"
    9             8  <Q     version, always 1
    17            1  <B     dtype code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 8 uint16;
                            6 float64 and 7 float32 exist but are not token data)
    18            8  <Q     S  sequence count
    26            8  <Q     D  document-index count (documents + 1: the list starts with 0)
    34            4*S <i4   sequence_lengths   tokens per sequence
    34+4S         8*S <i8   sequence_pointers  BYTE offset of each sequence in .bin
    34+12S        8*D <i8   document_indices   0, then the sequence index where each document ends
    34+12S+8D     1*S <i1   sequence_modes     multimodal datasets only (not flagged in the header;
                                               refused here)

Reading: every Megatron *sequence* is one sample (`ds[i].input_ids` = sequence i, loss mask all
True, doc_lens = [len]), as Megatron's GPTDataset treats them. `ds.doc_continues(i)` is True for a
sequence that is not the first of its Megatron document (sentence-split data).

Example:
    >>> ds = open_megatron("data/corpus_text_document")              # doctest: +SKIP
    >>> ds[0].input_ids[:5], len(ds), ds.num_tokens, ds.dtype          # doctest: +SKIP
    >>> export_megatron(open_dataset("out/corpus"), "mega/corpus")     # doctest: +SKIP
"""

from __future__ import annotations

import os
import struct
import warnings
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shardfmt.reader import CorruptShardError, Sample
from shardfmt.spec import CODE_TO_DTYPE, DTYPE_CODES
from shardfmt.writer import fsync_dir

__all__ = ["MEGATRON_MAGIC", "MegatronDataset", "MegatronExport", "open_megatron",
           "export_megatron"]

MEGATRON_MAGIC = b"MMIDIDX\x00\x00"
MEGATRON_VERSION = 1
MEGATRON_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, S, D
assert MEGATRON_HEADER.size == 34
_FLOAT_CODES = {6: "float64", 7: "float32"}
_CHUNK = 1 << 22  # elements per vectorised pass over big arrays (max_token_id, validate, export)


def megatron_index_nbytes(num_sequences: int, num_doc_indices: int) -> int:
    """Exact size of a text (non-multimodal) `.idx` with these header counts."""
    return MEGATRON_HEADER.size + 12 * num_sequences + 8 * num_doc_indices


def _split_prefix(prefix: str | os.PathLike) -> tuple[Path, Path]:
    prefix = os.fspath(prefix)
    if prefix.endswith((".bin", ".idx")):  # accept either file name as the prefix too
        prefix = prefix[:-4]
    return Path(prefix + ".idx"), Path(prefix + ".bin")


class MegatronDataset:
    """A Megatron MMIDIDX pair, read zero-copy through mmap with the shardfmt reader interface.

    Opening reads the 34-byte header and checks file sizes and the first/last index entries
    (O(1)); `validate()` checks every index entry (vectorised, O(S)). Each `ds[i]` checks its own
    pointer against the `.bin` size, so a corrupt entry raises instead of reading garbage.
    Picklable: the mappings are dropped and re-opened lazily (also after a fork).

    Example:
        >>> ds = MegatronDataset("data/corpus_text_document")      # doctest: +SKIP
        >>> s = ds[3]; s.input_ids, s.loss_mask.all(), s.doc_lens    # doctest: +SKIP
    """

    def __init__(self, prefix: str | os.PathLike, *, validate: bool = False) -> None:
        self.idx_path, self.bin_path = _split_prefix(prefix)
        self.prefix = str(self.idx_path)[:-4]
        for path in (self.idx_path, self.bin_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing Megatron file (prefix {self.prefix!r} "
                                        f"needs both .bin and .idx)")
        idx_size = self.idx_path.stat().st_size
        self.bin_nbytes = self.bin_path.stat().st_size
        with open(self.idx_path, "rb") as f:
            raw = f.read(MEGATRON_HEADER.size)
        if len(raw) < MEGATRON_HEADER.size:
            raise CorruptShardError(f"{self.idx_path}: {len(raw)} bytes, shorter than the "
                                    f"{MEGATRON_HEADER.size}-byte MMIDIDX header (truncated file?)")
        magic, version, code, num_seqs, num_doc_idx = MEGATRON_HEADER.unpack(raw)
        if magic != MEGATRON_MAGIC:
            raise CorruptShardError(f"{self.idx_path}: bad magic {magic!r} (expected "
                                    f"{MEGATRON_MAGIC!r}); not a Megatron MMIDIDX index")
        if version != MEGATRON_VERSION:
            raise CorruptShardError(f"{self.idx_path}: MMIDIDX version {version}, only version "
                                    f"{MEGATRON_VERSION} exists")
        if code in _FLOAT_CODES:
            raise CorruptShardError(f"{self.idx_path}: dtype code {code} ({_FLOAT_CODES[code]}) "
                                    f"holds floats, not token ids")
        if code not in CODE_TO_DTYPE:
            raise CorruptShardError(f"{self.idx_path}: unknown dtype code {code}")
        # token dtype of .bin (little-endian, as Megatron writes on every platform it runs on)
        self._dtype = np.dtype(CODE_TO_DTYPE[code]).newbyteorder("<")
        # S: number of sequences (= samples here)
        self.num_sequences = int(num_seqs)
        # D: length of document_indices (documents + 1)
        self.num_doc_indices = int(num_doc_idx)
        want = megatron_index_nbytes(self.num_sequences, self.num_doc_indices)
        if idx_size != want:
            hint = ("; that is exactly one extra byte per sequence: a multimodal index with "
                    "sequence modes, which is not token data") if (
                idx_size == want + self.num_sequences and self.num_sequences) else (
                " (truncated, padded, or the header counts are corrupt)")
            raise CorruptShardError(f"{self.idx_path}: {idx_size} bytes, but the header's "
                                    f"{self.num_sequences} sequences and {self.num_doc_indices} "
                                    f"document indices need {want}{hint}")
        if self.num_doc_indices < 1:
            raise CorruptShardError(f"{self.idx_path}: document index count is 0; Megatron "
                                    f"indices always start with a 0 entry")
        if self.bin_nbytes % self._dtype.itemsize:
            raise CorruptShardError(f"{self.bin_path}: {self.bin_nbytes} bytes is not a whole "
                                    f"number of {self._dtype.name} tokens (truncated?)")
        self._arrays: dict[str, np.ndarray] | None = None
        self._pid = -1
        self._num_tokens: int | None = None
        self._max_token_id: int | None = None
        a = self._open()
        doc_idx = a["document_indices"]
        if int(doc_idx[0]) != 0 or int(doc_idx[-1]) != self.num_sequences:
            raise CorruptShardError(f"{self.idx_path}: document indices run from "
                                    f"{int(doc_idx[0])} to {int(doc_idx[-1])}, expected 0 to the "
                                    f"sequence count {self.num_sequences}")
        if self.num_sequences:
            self._check_sequence(self.num_sequences - 1)
        if validate:
            self.validate()

    # -- mapping -------------------------------------------------------------------------------
    def _open(self) -> dict[str, np.ndarray]:
        """Map both files (once per process) and return the index arrays plus `tokens`."""
        if self._arrays is not None and self._pid == os.getpid():
            return self._arrays
        s, d = self.num_sequences, self.num_doc_indices
        idx_mm = np.memmap(self.idx_path, dtype=np.uint8, mode="r")
        off = MEGATRON_HEADER.size
        arrays = {
            # tokens per sequence
            "sequence_lengths": np.frombuffer(idx_mm, dtype="<i4", count=s, offset=off),
            # byte offset of each sequence in .bin
            "sequence_pointers": np.frombuffer(idx_mm, dtype="<i8", count=s, offset=off + 4 * s),
            # 0, then the sequence index ending each document
            "document_indices": np.frombuffer(idx_mm, dtype="<i8", count=d, offset=off + 12 * s),
        }
        if self.bin_nbytes:
            arrays["bin"] = np.memmap(self.bin_path, dtype=np.uint8, mode="r")
        else:  # mmap refuses empty files
            arrays["bin"] = np.zeros(0, dtype=np.uint8)
        self._arrays, self._pid = arrays, os.getpid()
        return arrays

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"], state["_pid"] = None, -1
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # -- summary -------------------------------------------------------------------------------
    @property
    def manifests(self) -> list[dict]:
        """No shardfmt manifest: Megatron data carries no tokenizer identity or template."""
        return []

    def __len__(self) -> int:
        return self.num_sequences

    def __repr__(self) -> str:
        return (f"MegatronDataset({self.prefix!r}, sequences={self.num_sequences}, "
                f"documents={self.num_doc_indices - 1}, dtype={self.dtype.name})")

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._dtype.name)

    @property
    def sequence_lengths(self) -> np.ndarray:
        """int32 tokens per sequence (zero-copy view of the index)."""
        return self._open()["sequence_lengths"]

    @property
    def sequence_pointers(self) -> np.ndarray:
        """int64 byte offset of every sequence in `.bin` (zero-copy view of the index)."""
        return self._open()["sequence_pointers"]

    @property
    def document_indices(self) -> np.ndarray:
        """int64: 0, then the sequence index where each document ends (zero-copy view)."""
        return self._open()["document_indices"]

    @property
    def num_documents(self) -> int:
        return self.num_doc_indices - 1

    def sample_lengths(self) -> np.ndarray:
        """Every sample's (= sequence's) token count, int64."""
        return self.sequence_lengths.astype(np.int64)

    @property
    def num_tokens(self) -> int:
        """Tokens over all sequences (sum of the lengths; computed once)."""
        if self._num_tokens is None:
            self._num_tokens = int(self.sequence_lengths.sum(dtype=np.int64))
        return self._num_tokens

    @property
    def max_token_id(self) -> int:
        """Largest id in `.bin` (-1 if empty); one chunked scan of the file, then cached."""
        if self._max_token_id is None:
            tokens = self._tokens()
            best = -1
            for lo in range(0, tokens.size, _CHUNK):
                best = max(best, int(tokens[lo:lo + _CHUNK].max()))
            self._max_token_id = best
        return self._max_token_id

    def _tokens(self) -> np.ndarray:
        return np.frombuffer(self._open()["bin"], dtype=self._dtype,
                             count=self.bin_nbytes // self._dtype.itemsize)

    # -- access --------------------------------------------------------------------------------
    def _check_sequence(self, i: int) -> tuple[int, int]:
        a = self._open()
        n = int(a["sequence_lengths"][i])
        ptr = int(a["sequence_pointers"][i])
        size = self._dtype.itemsize
        if n < 0 or ptr < 0 or ptr % size or ptr + n * size > self.bin_nbytes:
            raise CorruptShardError(
                f"{self.idx_path}: sequence {i} (pointer {ptr} bytes, {n} tokens of "
                f"{self._dtype.name}) lies outside {self.bin_path} ({self.bin_nbytes} bytes)"
                + (" or is misaligned" if ptr >= 0 and ptr % size else ""))
        return ptr, n

    def __getitem__(self, i: int) -> Sample:
        i = int(i)
        if i < 0:
            i += self.num_sequences
        if not 0 <= i < self.num_sequences:
            raise IndexError(f"sample index {i} out of range for {self.num_sequences} sequences "
                             f"in {self.idx_path}")
        ptr, n = self._check_sequence(i)
        tokens = np.frombuffer(self._open()["bin"], dtype=self._dtype, count=n, offset=ptr)
        return Sample(tokens, np.ones(n, dtype=bool), np.array([n], dtype=np.int32))

    def doc_continues(self, i: int) -> np.ndarray:
        """[True] if sequence `i` is not the first of its Megatron document, else [False]."""
        i = int(i) + (self.num_sequences if int(i) < 0 else 0)
        if not 0 <= i < self.num_sequences:
            raise IndexError(f"sample index {i} out of range for {self.num_sequences} sequences")
        doc_idx = self.document_indices
        k = int(np.searchsorted(doc_idx, i, side="right"))  # first document end > i
        return np.array([int(doc_idx[k - 1]) != i], dtype=bool)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def validate(self) -> None:
        """Check every index entry (vectorised, chunked); CorruptShardError names the file."""
        a = self._open()
        size = self._dtype.itemsize
        for lo in range(0, self.num_sequences, _CHUNK):
            lens = a["sequence_lengths"][lo:lo + _CHUNK].astype(np.int64)
            ptrs = a["sequence_pointers"][lo:lo + _CHUNK]
            bad = np.flatnonzero((lens < 0) | (ptrs < 0) | (ptrs % size != 0)
                                 | (ptrs + lens * size > self.bin_nbytes))
            if bad.size:
                self._check_sequence(lo + int(bad[0]))  # raises with the details
        doc_idx = a["document_indices"]
        for lo in range(0, self.num_doc_indices, _CHUNK):
            base = max(lo - 1, 0)  # overlap one entry so chunk borders are checked too
            drops = np.flatnonzero(np.diff(doc_idx[base:lo + _CHUNK]) < 0)
            if drops.size:
                k = base + int(drops[0]) + 1
                raise CorruptShardError(f"{self.idx_path}: document index {k} "
                                        f"({int(doc_idx[k])}) is smaller than the one before it "
                                        f"({int(doc_idx[k - 1])})")


def open_megatron(prefix: str | os.PathLike, *, validate: bool = False) -> MegatronDataset:
    """Open a Megatron MMIDIDX pair `prefix.bin` / `prefix.idx` as a pretrain dataset.

    Example:
        >>> ds = open_megatron("data/corpus_text_document")          # doctest: +SKIP
        >>> len(ds), ds[0].input_ids.dtype                             # doctest: +SKIP
        (123456, dtype('uint16'))
    """
    return MegatronDataset(prefix, validate=validate)


# ----------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MegatronExport:
    """What `export_megatron` wrote."""

    prefix: str
    dtype: str
    num_sequences: int
    num_documents: int
    num_tokens: int
    loss_mask_dropped: bool  # True if some sample had untrained tokens (Megatron has no loss mask)

    def __str__(self) -> str:
        note = "; WARNING: loss masks dropped, every token is trained" if self.loss_mask_dropped \
            else ""
        return (f"{self.num_sequences} sequences, {self.num_documents} documents, "
                f"{self.num_tokens} tokens, {self.dtype}{note}")


class _ScratchArray:
    """Append-only on-disk array (constant memory): buffered appends, then chunked re-reads."""

    def __init__(self, path: Path, typecode: str, np_dtype: str) -> None:
        self.path, self.np_dtype = path, np.dtype(np_dtype)
        self._f = open(path, "wb")
        self._buf = array(typecode)
        self.count = 0

    def append(self, value: int) -> None:
        self._buf.append(value)
        self.count += 1
        if len(self._buf) >= 1 << 16:
            self._buf.tofile(self._f)
            del self._buf[:]

    def finish(self) -> None:
        self._buf.tofile(self._f)
        del self._buf[:]
        self._f.close()

    def chunks(self):
        with open(self.path, "rb") as f:
            while True:
                raw = f.read(_CHUNK * self.np_dtype.itemsize)
                if not raw:
                    return
                yield np.frombuffer(raw, dtype=self.np_dtype)

    def discard(self) -> None:
        if not self._f.closed:
            self._f.close()
        self.path.unlink(missing_ok=True)


def _fitting_dtype(lo: int, hi: int) -> str:
    for name in ("uint8", "int8", "uint16", "int16", "int32", "int64"):
        info = np.iinfo(name)
        if info.min <= lo and hi <= info.max:
            return name
    return "int64"


def export_megatron(dataset: Any, prefix: str | os.PathLike, *, dtype: str | np.dtype | None = None,
                    split: str = "document", overwrite: bool = False) -> MegatronExport:
    """Write `dataset` (anything with `len()` and `[i]` -> Sample) as Megatron `prefix.bin/.idx`.

    What becomes what (Megatron has samples of its own, built at training time):
      split="document" (default): one Megatron sequence per *whole document*, one document per
        sequence (document_indices = 0, 1, ..., S) -- the layout Megatron's preprocess_data.py
        writes and GPTDataset expects. A document segment that continues a document of the
        previous sample (`dataset.doc_continues(i)`, pretrain chunking) is appended to that
        document's sequence, so chunked documents are whole again. Datasets without
        `doc_continues` (or where it is all False): every segment is its own document.
      split="segment": one sequence per document segment (so a packed sample's segments stay
        separate sequences); segments continuing a document stay in the same Megatron document.
    Sample boundaries and packing are not kept (GPTDataset packs sequences itself). Loss masks are
    dropped: Megatron trains every token; the result's `loss_mask_dropped` flag (and a
    UserWarning) says when that lost information (qa/chat data).

    `dtype` defaults to the dataset's; a narrower one is allowed if every id fits (checked per
    sample, never wrapped). `.bin` is streamed and the index is assembled from on-disk scratch
    arrays, so memory is constant; files are written under temp names, fsynced, and renamed
    (.bin, then .idx last).

    Example:
        >>> ds = open_dataset("out/corpus")                                     # doctest: +SKIP
        >>> r = export_megatron(ds, "mega/corpus_text_document")                # doctest: +SKIP
        >>> r.num_sequences, r.loss_mask_dropped                                # doctest: +SKIP
    """
    if split not in ("document", "segment"):
        raise ValueError(f"split must be 'document' or 'segment', got {split!r}")
    out_dtype = np.dtype(dtype if dtype is not None else getattr(dataset, "dtype", "int32"))
    if out_dtype.name not in DTYPE_CODES:
        raise ValueError(f"dtype {out_dtype.name} has no Megatron token dtype code; use one of "
                         f"{sorted(DTYPE_CODES)}")
    out_dtype = out_dtype.newbyteorder("<")
    info = np.iinfo(out_dtype)
    idx_path, bin_path = _split_prefix(prefix)
    if not overwrite:
        for path in (idx_path, bin_path):
            if path.exists():
                raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    idx_path.parent.mkdir(parents=True, exist_ok=True)
    tag = f".tmp{os.getpid()}"
    bin_tmp = bin_path.with_name(bin_path.name + tag)
    idx_tmp = idx_path.with_name(idx_path.name + tag)
    lens = _ScratchArray(idx_path.with_name(idx_path.name + tag + ".lens"), "q", "<i8")
    doc_ends = _ScratchArray(idx_path.with_name(idx_path.name + tag + ".docs"), "q", "<i8")
    continues_fn = getattr(dataset, "doc_continues", None)
    masks_dropped = False
    num_tokens = 0
    try:
        with open(bin_tmp, "wb") as bin_f:
            pending: list[bytes] = []
            pending_bytes = 0
            open_len = -1  # split="document": tokens in the sequence being built (-1: none)
            for i in range(len(dataset)):
                s = dataset[i]
                ids = np.asarray(s.input_ids)
                doc_lens = np.asarray(s.doc_lens, dtype=np.int64)
                if int(doc_lens.sum()) != ids.size:
                    raise ValueError(f"sample {i}: doc_lens sum to {int(doc_lens.sum())}, not its "
                                     f"{ids.size} tokens")
                if not masks_dropped and not np.asarray(s.loss_mask).all():
                    masks_dropped = True
                if ids.size and not np.can_cast(ids.dtype, out_dtype, casting="safe"):
                    lo, hi = int(ids.min()), int(ids.max())
                    if lo < info.min or hi > info.max:
                        bad = hi if hi > info.max else lo
                        raise ValueError(f"sample {i}: token id {bad} does not fit {out_dtype.name}"
                                         f"; export with dtype={_fitting_dtype(lo, hi)!r}")
                cont = (np.asarray(continues_fn(i), dtype=bool) if continues_fn is not None
                        else np.zeros(doc_lens.size, dtype=bool))
                for n, c in zip(doc_lens.tolist(), cont.tolist()):
                    if n < 0 or n > np.iinfo(np.int32).max:
                        raise ValueError(f"sample {i}: document segment length {n} is outside "
                                         f"Megatron's int32 sequence lengths")
                    if split == "segment":
                        if not c and lens.count:
                            doc_ends.append(lens.count)  # previous document ends here
                        lens.append(n)
                    else:
                        if c and open_len >= 0:
                            open_len += n
                        else:
                            if open_len >= 0:
                                lens.append(open_len)
                            open_len = n
                        if open_len > np.iinfo(np.int32).max:
                            raise ValueError(f"sample {i}: a document of {open_len} tokens "
                                             f"exceeds Megatron's int32 sequence length")
                data = ids.astype(out_dtype, copy=False).tobytes()
                pending.append(data)
                pending_bytes += len(data)
                num_tokens += ids.size
                if pending_bytes >= 1 << 22:
                    bin_f.write(b"".join(pending))
                    pending, pending_bytes = [], 0
            bin_f.write(b"".join(pending))
            bin_f.flush()
            os.fsync(bin_f.fileno())
        if split == "document":
            if open_len >= 0:
                lens.append(open_len)
            for k in range(1, lens.count + 1):  # one document per sequence
                doc_ends.append(k)
        elif lens.count:
            doc_ends.append(lens.count)
        lens.finish()
        doc_ends.finish()
        num_seqs, num_docs = lens.count, doc_ends.count
        with open(idx_tmp, "wb") as f:
            # magic, version 1, dtype code, S, D (= documents + 1)
            f.write(MEGATRON_HEADER.pack(MEGATRON_MAGIC, MEGATRON_VERSION,
                                         DTYPE_CODES[out_dtype.name], num_seqs, num_docs + 1))
            # sequence_lengths, int32
            for chunk in lens.chunks():
                f.write(chunk.astype("<i4").tobytes())
            # sequence_pointers, int64 byte offsets (running sum of lengths * itemsize)
            base = 0
            for chunk in lens.chunks():
                ends = np.cumsum(chunk * out_dtype.itemsize, dtype=np.int64) + base
                f.write((ends - chunk * out_dtype.itemsize).astype("<i8").tobytes())
                base = int(ends[-1])
            # document_indices, int64: 0, then each document's end
            f.write(np.zeros(1, "<i8").tobytes())
            for chunk in doc_ends.chunks():
                f.write(chunk.astype("<i8").tobytes())
            f.flush()
            os.fsync(f.fileno())
        if base != num_tokens * out_dtype.itemsize:  # internal consistency, never expected
            raise AssertionError(f"{idx_tmp}: pointers end at {base} bytes, .bin has "
                                 f"{num_tokens * out_dtype.itemsize}")
        os.replace(bin_tmp, bin_path)
        os.replace(idx_tmp, idx_path)  # the index last: a pair with an .idx is complete
        fsync_dir(idx_path.parent)
    except BaseException:
        bin_tmp.unlink(missing_ok=True)
        idx_tmp.unlink(missing_ok=True)
        raise
    finally:
        lens.discard()
        doc_ends.discard()
    if masks_dropped:
        warnings.warn(f"export_megatron({str(prefix)!r}): some samples have untrained tokens "
                      f"(loss mask not all ones); Megatron has no loss mask, so the export "
                      f"trains every token", UserWarning, stacklevel=2)
    return MegatronExport(prefix=str(idx_path)[:-4], dtype=out_dtype.name, num_sequences=num_seqs,
                          num_documents=num_docs, num_tokens=num_tokens,
                          loss_mask_dropped=masks_dropped)

