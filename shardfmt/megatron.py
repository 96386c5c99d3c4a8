"""Megatron-LM `MMIDIDX` indexed datasets: read them as pretrain data, write them for Megatron.

numpy only: megatron-core is needed by the interop tests, never here. The byte layout lives in
`shardfmt.spec` (second half). A Megatron dataset is a pair PREFIX.bin / PREFIX.idx.

Reading: every Megatron *sequence* is one sample (`ds[i].input_ids` = sequence i, loss mask all
True, doc_lens = [len]), as Megatron's GPTDataset treats them. `ds.doc_continues(i)` is True for a
sequence that is not the first of its Megatron document (sentence-split data).

Writing: `MegatronBuilder` (add_document / finalize, like megatron-core's IndexedDatasetBuilder,
but streaming to disk in constant memory and atomic), and `export_megatron(dataset, prefix)` on
top of it for any token dataset.

Example:
    >>> ds = open_megatron("data/corpus_text_document")              # doctest: +SKIP
    >>> ds[0].input_ids[:5], len(ds), ds.num_tokens, ds.dtype          # doctest: +SKIP
    >>> export_megatron(open_dataset("out/corpus"), "mega/corpus")     # doctest: +SKIP
"""

from __future__ import annotations

import os
import warnings
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shardfmt.errors import CorruptShardError, DatasetNotFoundError, OutputExistsError, UsageError
from shardfmt.protocol import Sample, length_summary
from shardfmt.spec import (DTYPE_CODES, MEGATRON_ARRAYS, MEGATRON_HEADER, MEGATRON_MAGIC,
                           megatron_array_offsets, megatron_index_nbytes, pack_megatron_header,
                           token_dtype, unpack_megatron_header)
from shardfmt.writer import fsync_dir

__all__ = ["MEGATRON_HEADER", "MEGATRON_MAGIC", "megatron_index_nbytes", "MegatronDataset",
           "MegatronBuilder", "MegatronExport", "open_megatron", "export_megatron"]

_CHUNK = 1 << 22  # elements per vectorised pass over big arrays (max_token_id, validate, export)


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
                raise DatasetNotFoundError(f"{path}: missing Megatron file (prefix {self.prefix!r} "
                                        f"needs both .bin and .idx)")
        idx_size = self.idx_path.stat().st_size
        self.bin_nbytes = self.bin_path.stat().st_size
        with open(self.idx_path, "rb") as f:
            raw = f.read(MEGATRON_HEADER.size)
        self.header = unpack_megatron_header(raw, path=str(self.idx_path), file_size=idx_size)
        # token dtype of .bin (little-endian, as Megatron writes on every platform it runs on)
        self._dtype = token_dtype(self.header.dtype)
        self.num_sequences = self.header.num_sequences      # S (= samples here)
        self.num_doc_indices = self.header.num_doc_indices  # D (= documents + 1)
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
        idx_mm = np.memmap(self.idx_path, dtype=np.uint8, mode="r")
        arrays = {name: np.frombuffer(idx_mm, dtype=dt, count=count, offset=off)
                  for name, (off, count, dt) in megatron_array_offsets(self.header).items()}
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
    kind = "megatron"

    @property
    def paths(self) -> list[str]:
        return [self.prefix]

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

    def summary(self) -> dict:
        """Counts and length percentiles (reads the index; max_token_id scans .bin once)."""
        lengths = self.sample_lengths()
        return {"kind": self.kind, "paths": self.paths, "format": "Megatron-LM MMIDIDX",
                "encode_type": "pretrain (Megatron: every token trained)",
                "dtype": str(self.dtype), "samples": len(self), "documents": self.num_documents,
                "tokens": self.num_tokens, "max_token_id": self.max_token_id,
                "length": length_summary(lengths),
                "files": {"idx": f"{self.idx_path} ({self.idx_path.stat().st_size} bytes)",
                          "bin": f"{self.bin_path} ({self.bin_nbytes} bytes)"}}

    def verify(self) -> list[str]:
        """Megatron files carry no checksums: the header and sizes were checked at open; this
        checks every index entry (pointers inside .bin, aligned; document indices sorted)."""
        try:
            self.validate()
        except CorruptShardError as err:
            return [str(err)]
        return []

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
        self.last: int | None = None

    def append(self, value: int) -> None:
        self._buf.append(value)
        self.count += 1
        self.last = value
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


class MegatronBuilder:
    """Write a Megatron `PREFIX.bin/.idx` pair document by document, in constant memory.

    Like megatron-core's IndexedDatasetBuilder (add_item / end_document / add_document /
    finalize), but the token stream and the index arrays go to disk as they come (temp files),
    and `finalize()` writes the index and renames both files into place, `.idx` last, so a pair
    with an `.idx` is always complete. A builder left without `finalize()` (an exception inside
    `with`, or `discard()`) leaves no files behind.

    Example:
        >>> with MegatronBuilder("mega/corpus", dtype="uint16") as b:        # doctest: +SKIP
        ...     b.add_document([5, 6, 7, 8], lengths=[3, 1])   # one document, two sequences
        ...     result = b.finalize()
    """

    def __init__(self, prefix: str | os.PathLike, *, dtype: str | np.dtype,
                 overwrite: bool = False) -> None:
        try:
            out_dtype = np.dtype(dtype)
        except TypeError:
            out_dtype = None
        if out_dtype is None or out_dtype.name not in DTYPE_CODES:
            raise UsageError(f"--dtype {dtype}: no Megatron token dtype code; use one of "
                             f"{sorted(DTYPE_CODES)}")
        self.dtype = token_dtype(out_dtype)
        self._info = np.iinfo(self.dtype)
        self.idx_path, self.bin_path = _split_prefix(prefix)
        if not overwrite:
            for path in (self.idx_path, self.bin_path):
                if path.exists():
                    raise OutputExistsError(f"{path} exists; pass --overwrite (overwrite=True) to "
                                            f"replace it")
        self.idx_path.parent.mkdir(parents=True, exist_ok=True)
        tag = f".tmp{os.getpid()}"
        self._bin_tmp = self.bin_path.with_name(self.bin_path.name + tag)
        self._idx_tmp = self.idx_path.with_name(self.idx_path.name + tag)
        self._lens = _ScratchArray(self.idx_path.with_name(self.idx_path.name + tag + ".lens"),
                                   "q", "<i8")
        self._doc_ends = _ScratchArray(self.idx_path.with_name(self.idx_path.name + tag + ".docs"),
                                       "q", "<i8")
        self._bin = open(self._bin_tmp, "wb")
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._open_len = -1     # tokens in the sequence being built (-1: none open)
        self.num_tokens = 0
        self.loss_mask_dropped = False  # set by export_megatron; reported in the result
        self._finalized = False

    # -- adding -------------------------------------------------------------------------------
    def add_tokens(self, tokens: np.ndarray | list[int]) -> None:
        """Append tokens to the open sequence (opening one if none is open)."""
        ids = np.asarray(tokens)
        if ids.size and not np.can_cast(ids.dtype, self.dtype, casting="safe"):
            lo, hi = int(ids.min()), int(ids.max())
            if lo < self._info.min or hi > self._info.max:
                bad = hi if hi > self._info.max else lo
                raise UsageError(f"token id {bad} does not fit {self.dtype.name}; export with "
                                 f"--dtype {_fitting_dtype(lo, hi)} (dtype={_fitting_dtype(lo, hi)!r})")
        self._open_len = max(self._open_len, 0) + ids.size
        if self._open_len > np.iinfo(np.int32).max:
            raise UsageError(f"a sequence of {self._open_len} tokens exceeds Megatron's int32 "
                             f"sequence lengths; export with --split segment")
        data = ids.astype(self.dtype, copy=False).tobytes()
        self._pending.append(data)
        self._pending_bytes += len(data)
        self.num_tokens += ids.size
        if self._pending_bytes >= 1 << 22:
            self._flush()

    def end_sequence(self) -> None:
        """Close the open sequence (an empty one if nothing was added since the last)."""
        self._lens.append(max(self._open_len, 0))
        self._open_len = -1

    def end_document(self) -> None:
        """Close the open sequence (if any) and end the document at the last sequence (a no-op
        when no sequence was added since the last document ended)."""
        if self._finalized:
            raise ValueError(f"{self.idx_path}: the builder is finalized; start a new one")
        if self._open_len >= 0:
            self.end_sequence()
        if self._lens.count and (not self._doc_ends.count or self._doc_ends.last != self._lens.count):
            self._doc_ends.append(self._lens.count)

    def add_document(self, tokens: np.ndarray | list[int], lengths: list[int] | None = None) -> None:
        """One whole document: `tokens`, split into sequences of `lengths` (default: one)."""
        ids = np.asarray(tokens)
        lengths = [ids.size] if lengths is None else [int(n) for n in lengths]
        if sum(lengths) != ids.size or any(n < 0 for n in lengths):
            raise ValueError(f"add_document: lengths {lengths} do not split {ids.size} tokens")
        pos = 0
        for n in lengths:
            self.add_tokens(ids[pos:pos + n])
            self.end_sequence()
            pos += n
        self.end_document()

    # -- finishing ----------------------------------------------------------------------------
    def _flush(self) -> None:
        self._bin.write(b"".join(self._pending))
        self._pending, self._pending_bytes = [], 0

    def finalize(self) -> "MegatronExport":
        """Write the index, rename both files into place (`.idx` last); return what was written."""
        try:
            self.end_document()
            self._flush()
            self._bin.flush()
            os.fsync(self._bin.fileno())
            self._bin.close()
            self._lens.finish()
            self._doc_ends.finish()
            num_seqs, num_docs = self._lens.count, self._doc_ends.count
            itemsize = self.dtype.itemsize
            with open(self._idx_tmp, "wb") as f:
                f.write(pack_megatron_header(self.dtype.name, num_seqs, num_docs + 1))
                # the arrays in the file order of spec.MEGATRON_ARRAYS
                lens_dt, ptrs_dt, docs_dt = (MEGATRON_ARRAYS[k] for k in (
                    "sequence_lengths", "sequence_pointers", "document_indices"))
                for chunk in self._lens.chunks():
                    f.write(chunk.astype(lens_dt).tobytes())
                base = 0
                for chunk in self._lens.chunks():
                    ends = np.cumsum(chunk * itemsize, dtype=np.int64) + base
                    f.write((ends - chunk * itemsize).astype(ptrs_dt).tobytes())
                    base = int(ends[-1])
                f.write(np.zeros(1, docs_dt).tobytes())   # document_indices start with 0
                for chunk in self._doc_ends.chunks():
                    f.write(chunk.astype(docs_dt).tobytes())
                f.flush()
                os.fsync(f.fileno())
            if base != self.num_tokens * itemsize:  # internal consistency, never expected
                raise AssertionError(f"{self._idx_tmp}: pointers end at {base} bytes, .bin has "
                                     f"{self.num_tokens * itemsize}")
            os.replace(self._bin_tmp, self.bin_path)
            os.replace(self._idx_tmp, self.idx_path)  # the index last: a pair with .idx is complete
            fsync_dir(self.idx_path.parent)
        except BaseException:
            self.discard()
            raise
        self._lens.discard()
        self._doc_ends.discard()
        self._finalized = True
        return MegatronExport(prefix=str(self.idx_path)[:-4], dtype=self.dtype.name,
                              num_sequences=num_seqs, num_documents=num_docs,
                              num_tokens=self.num_tokens, loss_mask_dropped=self.loss_mask_dropped)

    def discard(self) -> None:
        """Abandon the build: close and delete every temp file."""
        if not self._bin.closed:
            self._bin.close()
        self._bin_tmp.unlink(missing_ok=True)
        self._idx_tmp.unlink(missing_ok=True)
        self._lens.discard()
        self._doc_ends.discard()

    def __enter__(self) -> "MegatronBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._finalized:  # an error, or no finalize(): leave nothing that looks written
            self.discard()


def _refuse_labelled_samples(dataset: Any) -> None:
    """Preference pairs and KTO examples carry meaning Megatron's format has no field for (which
    side is chosen; the desirable/undesirable label). Exported, every rejected or undesirable
    answer would become plain training text, so such datasets are refused instead."""
    from shardfmt.preference import is_kto, is_preference
    for directory, manifest in zip(getattr(dataset, "directories", []),
                                   getattr(dataset, "manifests", [])):
        if is_preference(manifest) or is_kto(manifest):
            what = ("preference pairs (chosen + rejected)" if is_preference(manifest)
                    else "KTO examples labelled desirable/undesirable")
            raise UsageError(f"{directory}: holds {what}; Megatron .bin/.idx has no field for "
                             f"the side or label, so exporting would train on the rejected/"
                             f"undesirable answers as plain text. Export pretrain, qa or chat "
                             f"datasets only (for SFT on the good answers, encode them with "
                             f"--encode_type qa or chat)")


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
    Preference and KTO datasets are refused (UsageError): Megatron has no field for a pair's
    side or an example's label.
    Sample boundaries and packing are not kept (GPTDataset packs sequences itself). Loss masks are
    dropped: Megatron trains every token; the result's `loss_mask_dropped` flag (and a
    UserWarning) says when that lost information (qa/chat data).

    `dtype` defaults to the dataset's; a narrower one is allowed if every id fits (checked per
    sample, never wrapped). Memory is constant (`MegatronBuilder`); nothing is left behind on error.

    Example:
        >>> ds = open_dataset("out/corpus")                                     # doctest: +SKIP
        >>> r = export_megatron(ds, "mega/corpus_text_document")                # doctest: +SKIP
        >>> r.num_sequences, r.loss_mask_dropped                                # doctest: +SKIP
    """
    if split not in ("document", "segment"):
        raise UsageError(f"--split must be 'document' or 'segment', got {split!r}")
    _refuse_labelled_samples(dataset)
    out_dtype = dtype if dtype is not None else getattr(dataset, "dtype", "int32")
    continues_fn = getattr(dataset, "doc_continues", None)
    with MegatronBuilder(prefix, dtype=out_dtype, overwrite=overwrite) as builder:
        for i in range(len(dataset)):
            s = dataset[i]
            ids = np.asarray(s.input_ids)
            doc_lens = np.asarray(s.doc_lens, dtype=np.int64)
            if int(doc_lens.sum()) != ids.size:
                raise ValueError(f"sample {i}: doc_lens sum to {int(doc_lens.sum())}, not its "
                                 f"{ids.size} tokens")
            if not builder.loss_mask_dropped and not np.asarray(s.loss_mask).all():
                builder.loss_mask_dropped = True
            cont = (np.asarray(continues_fn(i), dtype=bool) if continues_fn is not None
                    else np.zeros(doc_lens.size, dtype=bool))
            pos = 0
            for n, c in zip(doc_lens.tolist(), cont.tolist()):
                if n < 0:
                    raise ValueError(f"sample {i}: negative document segment length {n}")
                if split == "segment":
                    if not c:
                        builder.end_document()  # the previous document ends here
                    _add_sample_tokens(builder, ids[pos:pos + n], sample=i)
                    builder.end_sequence()
                else:
                    if not c:
                        builder.end_document()  # one sequence per document
                    _add_sample_tokens(builder, ids[pos:pos + n], sample=i)
                pos += n
        result = builder.finalize()
    if result.loss_mask_dropped:
        warnings.warn(f"export_megatron({str(prefix)!r}): some samples have untrained tokens "
                      f"(loss mask not all ones); Megatron has no loss mask, so the export "
                      f"trains every token", UserWarning, stacklevel=2)
    return result


def _add_sample_tokens(builder: MegatronBuilder, ids: np.ndarray, *, sample: int) -> None:
    """builder.add_tokens; its UsageError (an id too wide for the --dtype, a sequence too long
    for Megatron) stays a UsageError, so the CLI exits 2, and names the sample it came from."""
    try:
        builder.add_tokens(ids)
    except UsageError as err:
        raise UsageError(f"sample {sample}: {err}") from None
