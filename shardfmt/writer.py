"""Streaming shard writer: samples in, `.bin/.idx` shards + `manifest.json` out.

Crash safety, in the order things hit the disk:
  1. each shard is written as `NAME.bin.tmp` / `NAME.idx.tmp`, fsynced, then renamed;
  2. `manifest.json` is written last (tmp + fsync + rename + directory fsync).
A reader refuses a directory without a manifest, so a killed writer never leaves data that looks
complete. Memory is constant in corpus size: only the current shard's index (24 bytes a sample plus
4 a document segment and 8 a loss span) and a ~4 MB token buffer are held.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import sys
import time
from array import array
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import xxhash

from shardfmt.errors import OutputExistsError
from shardfmt.spec import (DOC_FLAG_CONTINUES, DOC_FLAG_UNDESIRABLE, FORMAT_VERSION,
                           INDEX_ARRAYS, MANIFEST_FORMAT, MANIFEST_NAME, WRITABLE_DTYPES, IndexHeader, dtype_max_id, pack_header,
                           shard_file_names, smallest_dtype_for, token_dtype)

ENCODE_TYPES = ("pretrain", "qa", "chat", "preference", "kto")  # preference, kto: shardfmt/preference.py
_FLUSH_TOKENS = 1 << 21  # ~4 MB of uint16 per write() call


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (POSIX needs the directory itself fsynced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def open_atomic(path: Path | str, mode: str = "wb", **open_kwargs) -> Iterator[IO]:
    """A file to write `path` through, durably and atomically: readers (and a machine that lost
    power) see either the old `path` or the whole new one.

    The data goes to a temp file of a unique name beside `path` (so two processes writing the same
    path, e.g. Slurm array tasks, never share a temp file), which is fsynced, renamed over `path`,
    and the directory fsynced. On any failure the temp file is removed and `path` is untouched.
    Cost: 2 fsyncs (file + directory). The temp file is created with mode 0o666 & ~umask, like
    open() (tempfile.mkstemp's 0o600 would hide a shared dataset's files from its group).
    """
    path = Path(path)
    for _ in range(100):  # O_EXCL: a name taken by another process is never reused
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"{path}: no free temp name beside it after 100 tries")
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # e.g. disk full: leave no half-written file behind
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` durably (`open_atomic`: unique temp + fsync + rename + directory
    fsync)."""
    with open_atomic(path, "w", encoding="utf-8") as f:
        f.write(text)


def fsync_tree(directory: Path | str) -> int:
    """fsync every regular file and directory below `directory` (and itself), so a tree written
    through the page cache (save_pretrained, DeepSpeed shards, a plot) is on disk before it is
    renamed into place. Symlinks are not followed. Returns the number of fsyncs (one per file and
    directory: a 20-file checkpoint costs 20-odd fsyncs, dominated by writing its bytes out)."""
    def fail(err: OSError) -> None:  # os.walk ignores errors by default: a missing tree raises
        raise err
    count = 0
    for root, _dirs, files in os.walk(directory, topdown=False, onerror=fail):  # children first
        for name in files:
            file_path = os.path.join(root, name)
            if os.path.islink(file_path) or not os.path.isfile(file_path):
                continue
            fd = os.open(file_path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            count += 1
        fsync_dir(Path(root))
        count += 1
    return count


def write_json_atomic(path: Path, obj: Any, *, default=None) -> None:
    """`write_text_atomic` of `obj` as indented JSON (`default` as in json.dumps)."""
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, default=default) + "\n")


class _HashingFile:
    """A binary file opened for writing that keeps its byte count and xxh3-64 as it goes."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "wb")
        self._hash = xxhash.xxh3_64()
        self.nbytes = 0

    def write(self, data: bytes | memoryview) -> None:
        self._f.write(data)
        self._hash.update(data)
        self.nbytes += len(data)

    def close_synced(self) -> str:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        return self._hash.hexdigest()

    def discard(self) -> None:
        try:
            self._f.close()
        except OSError:  # the buffered tail cannot be flushed (disk full): the file goes anyway
            pass
        self.path.unlink(missing_ok=True)


class _ShardBuilder:
    """One shard in progress: tokens stream to `.bin.tmp`; the index is kept until `finish`."""

    def __init__(self, directory: Path, corpus_name: str, index: int, dtype: np.dtype):
        self.bin_name, self.idx_name = shard_file_names(corpus_name, index)
        self.directory = directory
        self.dtype = dtype
        self.bin = _HashingFile(directory / (self.bin_name + ".tmp"))
        self.sample_offsets = array("q", [0, 0, 0])  # (tokens, docs, spans) rows, interleaved
        self.doc_lens = array("i")
        self.spans = array("i")
        self.doc_flags = bytearray()
        self.num_tokens = 0
        self.loss_tokens = 0
        self.max_token_id = -1
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0

    @property
    def num_samples(self) -> int:
        return len(self.sample_offsets) // 3 - 1

    def add(self, ids: np.ndarray, doc_lens: Sequence[int], spans: np.ndarray, flags: bytes,
            loss_tokens: int, max_id: int) -> None:
        self._pending.append(ids)
        self._pending_tokens += len(ids)
        self.num_tokens += len(ids)
        self.doc_lens.extend(doc_lens)
        self.doc_flags += flags
        self.spans.extend(spans.tolist())
        self.sample_offsets.extend((self.num_tokens, len(self.doc_lens), len(self.spans) // 2))
        self.loss_tokens += loss_tokens
        self.max_token_id = max(self.max_token_id, max_id)
        if self._pending_tokens >= _FLUSH_TOKENS:
            self._flush()

    def add_block(self, ids: np.ndarray, doc_lens: np.ndarray, docs_per_sample: np.ndarray,
                  sample_lens: np.ndarray, flags: bytes, max_id: int) -> None:
        """`add` for many all-trained samples at once (one span per document): the same index
        rows as one `add` per sample, built with numpy instead of a Python loop per sample."""
        n = len(sample_lens)
        rows = np.empty((n, 3), dtype=np.int64)
        np.cumsum(sample_lens, out=rows[:, 0])
        rows[:, 0] += self.num_tokens
        np.cumsum(docs_per_sample, out=rows[:, 1])
        rows[:, 2] = rows[:, 1] + len(self.spans) // 2   # one span per document segment
        rows[:, 1] += len(self.doc_lens)
        # a document's span is (its start, its end) inside its sample
        doc_ends = np.cumsum(doc_lens, dtype=np.int64)
        sample_starts = np.cumsum(sample_lens, dtype=np.int64) - sample_lens
        starts = doc_ends - doc_lens - np.repeat(sample_starts, docs_per_sample)
        spans = np.stack([starts, starts + doc_lens], axis=1).ravel()
        self._pending.append(ids)
        self._pending_tokens += len(ids)
        self.num_tokens += len(ids)
        self.doc_lens.frombytes(np.asarray(doc_lens, dtype=np.dtype(self.doc_lens.typecode))
                                .tobytes())
        self.doc_flags += flags
        self.spans.frombytes(spans.astype(np.dtype(self.spans.typecode)).tobytes())
        self.sample_offsets.frombytes(rows.astype(np.dtype(self.sample_offsets.typecode))
                                      .tobytes())
        self.loss_tokens += len(ids)
        self.max_token_id = max(self.max_token_id, max_id)
        if self._pending_tokens >= _FLUSH_TOKENS:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self.bin.write(np.concatenate(self._pending).astype(token_dtype(self.dtype),
                                                               copy=False).tobytes())
            self._pending, self._pending_tokens = [], 0

    def finish(self) -> dict:
        """Write the index, fsync both files, rename them into place; return the manifest entry."""
        self._flush()
        bin_hash = self.bin.close_synced()
        header = IndexHeader(FORMAT_VERSION, self.dtype.name, self.num_samples, len(self.doc_lens),
                             len(self.spans) // 2, self.num_tokens)
        idx = _HashingFile(self.directory / (self.idx_name + ".tmp"))
        idx.write(pack_header(header))
        arrays = {"sample_offsets": self.sample_offsets, "doc_lens": self.doc_lens,
                  "loss_spans": self.spans, "doc_flags": self.doc_flags}
        for name, (dt, _) in INDEX_ARRAYS.items():   # the file order (shardfmt/spec.py)
            # array("q"/"i") is native-endian; astype to the spec's little-endian dtype is a
            # no-op on x86/ARM. doc_flags is a bytearray (u1).
            arr = arrays[name]
            native = np.dtype(arr.typecode) if isinstance(arr, array) else np.uint8
            idx.write(np.frombuffer(arr, dtype=native).astype(dt, copy=False).tobytes())
        idx_hash = idx.close_synced()
        os.replace(self.bin.path, self.directory / self.bin_name)
        os.replace(idx.path, self.directory / self.idx_name)
        return {
            "name": self.bin_name[:-4],
            "samples": self.num_samples,
            "docs": len(self.doc_lens),
            "loss_spans": len(self.spans) // 2,
            "tokens": self.num_tokens,
            "loss_tokens": self.loss_tokens,
            "max_token_id": self.max_token_id,
            "files": {
                "bin": {"name": self.bin_name, "bytes": self.bin.nbytes, "xxh3_64": bin_hash},
                "idx": {"name": self.idx_name, "bytes": idx.nbytes, "xxh3_64": idx_hash},
            },
        }

    def discard(self) -> None:
        self.bin.discard()
        (self.directory / (self.idx_name + ".tmp")).unlink(missing_ok=True)


def sample_loss_spans(mask: np.ndarray, doc_lens: list[int]) -> np.ndarray:
    """Runs of True in a packed sample's `mask`, split at document boundaries (a span never
    covers two documents), as flat (start, end) pairs: the same spans as one np.diff per
    document, in one pass (~30 µs a document saved).

    >>> sample_loss_spans(np.array([0, 1, 1, 1, 0, 1], bool), [3, 3]).tolist()
    [1, 3, 3, 4, 5, 6]
    """
    edges = np.flatnonzero(np.diff(np.concatenate(([False], mask, [False])).astype(np.int8)))
    bounds = np.cumsum(doc_lens[:-1], dtype=np.int64)
    split = bounds[mask[bounds - 1] & mask[bounds]] if len(bounds) else bounds
    if len(split):  # a run crossing a boundary b: end it at b and start a new one at b
        edges = np.sort(np.concatenate([edges, split, split]), kind="stable")
    return edges.astype(np.int32)


class SampleBlock(NamedTuple):
    """Many consecutive samples in which every token is trained (pretrain chunks), as flat
    arrays: sample k is made of document segments `docs_per_sample[k]` long, taken in order from
    `doc_lens`, whose tokens are taken in order from `ids`. `continues[k]`: sample k's first
    segment continues a document begun in the previous sample. `ShardWriter.add_block` writes it
    byte-for-byte as `add_sample` would, one sample at a time, with no Python per sample.

    >>> SampleBlock(np.arange(6), np.array([2, 2, 2]), np.array([1, 2]),
    ...             np.array([False, True])).sample_lens().tolist()
    [2, 4]
    """

    ids: np.ndarray              # integer tokens of all samples, back to back
    doc_lens: np.ndarray         # length of each document segment (>= 1), in order
    docs_per_sample: np.ndarray  # segments in each sample (>= 1)
    continues: np.ndarray        # bool per sample

    def sample_lens(self) -> np.ndarray:
        """Tokens in each sample (int64)."""
        bounds = np.zeros(len(self.docs_per_sample) + 1, dtype=np.int64)
        np.cumsum(self.docs_per_sample, out=bounds[1:])
        seg_ends = np.zeros(len(self.doc_lens) + 1, dtype=np.int64)
        np.cumsum(self.doc_lens, out=seg_ends[1:])
        return np.diff(seg_ends[bounds])


class ShardWriter:
    """Write one dataset directory `out_dir/corpus_name/` of token shards.

    >>> with ShardWriter("out", "demo", dtype="uint16", encode_type="qa", max_length=8,
    ...                  tokenizer_info={"len": 100}) as w:                  # doctest: +SKIP
    ...     w.add_sample([([1, 5, 6, 2], [0, 0, 1, 1]), ([1, 7, 2], [0, 1, 1])])
    # -> out/demo/demo_00000.bin (7 tokens), demo_00000.idx, manifest.json
    """

    def __init__(self, out_dir: str | os.PathLike, corpus_name: str, *, dtype: str,
                 encode_type: str, max_length: int, tokenizer_info: dict,
                 tokens_per_file: int = 500_000_000, packing: str | dict = "none",
                 metadata: dict | None = None, overwrite: bool = False,
                 manifest_extra: dict | None = None):
        if dtype not in WRITABLE_DTYPES:
            raise ValueError(f"dtype={dtype!r}: choose one of {WRITABLE_DTYPES}")
        if encode_type not in ENCODE_TYPES:
            raise ValueError(f"encode_type={encode_type!r}: choose one of {ENCODE_TYPES}")
        if max_length < 1 or tokens_per_file < 1:
            raise ValueError(f"max_length ({max_length}) and tokens_per_file ({tokens_per_file}) "
                             f"must be positive")
        if not corpus_name or "/" in corpus_name or corpus_name.startswith("."):
            raise ValueError(f"corpus_name={corpus_name!r} must be a plain directory name")
        self.directory = Path(out_dir) / corpus_name
        self.corpus_name = corpus_name
        self.dtype = np.dtype(dtype)
        self.max_id = dtype_max_id(dtype)
        self.encode_type = encode_type
        self.max_length = int(max_length)
        self.tokens_per_file = int(tokens_per_file)
        self.tokenizer_info = dict(tokenizer_info)
        self.packing = packing
        self.metadata: dict = dict(metadata or {})
        # top-level manifest records beside the standard ones (e.g. "preference"); may be filled
        # in until close()
        self.manifest_extra: dict = dict(manifest_extra or {})
        self._prepare_directory(overwrite)
        self._shards: list[dict] = []
        self._current: _ShardBuilder | None = None
        self._closed = False
        self._started = time.time()

    # -- directory handling -------------------------------------------------------------------
    def _prepare_directory(self, overwrite: bool) -> None:
        """Refuse to touch what is not ours; when replacing an existing dataset, write beside it
        (`.NAME.incoming/`) and swap at close(), so the old dataset stays complete and readable
        until the new one is (a killed overwrite leaves the old one, never a half-written one)."""
        d = self.directory
        self._final: Path | None = None
        staging = d.parent / f".{self.corpus_name}.incoming"
        if staging.exists():  # left by a killed overwrite (the old dataset is still in place)
            shutil.rmtree(staging)
        if d.exists() and any(d.iterdir()):
            ours = (d / MANIFEST_NAME).exists() or any(d.glob(f"{self.corpus_name}_*.bin*")) \
                or any(d.glob(f"{self.corpus_name}_*.idx*"))
            if not overwrite:
                state = "a complete" if (d / MANIFEST_NAME).exists() else "an incomplete"
                raise OutputExistsError(f"{d} already holds {state} dataset; pass --overwrite "
                                        f"(overwrite=True) to replace it, or choose another "
                                        f"corpus name / output path")
            if not ours:
                raise OutputExistsError(f"{d} is not empty and does not look like a shardfmt "
                                        f"dataset (no manifest, no {self.corpus_name}_*.bin); "
                                        f"refusing to delete it even with overwrite")
            self._final, self.directory = d, staging
        self.directory.mkdir(parents=True, exist_ok=True)

    def _swap_into_place(self) -> None:
        """Replace the old dataset by the complete new one: two renames (old aside, new in), then
        the old one is deleted. A crash between the renames leaves both complete copies
        (`.NAME.replaced/` and `.NAME.incoming/`) and no NAME/: nothing incomplete is readable."""
        final, staging = self._final, self.directory
        replaced = final.parent / f".{self.corpus_name}.replaced"
        if replaced.exists():
            shutil.rmtree(replaced)
        os.replace(final, replaced)
        os.replace(staging, final)
        fsync_dir(final.parent)
        shutil.rmtree(replaced)
        self.directory, self._final = final, None

    # -- writing -------------------------------------------------------------------------------
    def add_sample(self, docs: Sequence[tuple[Iterable[int], Iterable[Any] | None]], *,
                   continues_previous: bool = False, doc_flags: Sequence[int] | None = None
                   ) -> None:
        """Append one training sample made of whole documents (or document segments).

        `docs` is a list of `(ids, loss_mask)` pairs; `loss_mask=None` means every token is
        trained (pretrain: no mask array is built, ~2x faster). `continues_previous=True` marks
        the first segment as the continuation of a document begun in the previous sample.
        `doc_flags`: further flag bits per segment (DOC_FLAG_UNDESIRABLE in kto datasets).
        """
        if self._closed:
            raise RuntimeError(f"{self.directory}: add_sample after close()/abort()")
        if not docs:
            raise ValueError("add_sample: a sample needs at least one document")
        id_parts, mask_parts, lens = [], [], []
        all_trained = True
        for k, (ids, mask) in enumerate(docs):
            ids_arr = np.asarray(ids)
            if ids_arr.ndim != 1 or len(ids_arr) == 0:
                raise ValueError(f"document {k}: ids must be a non-empty 1-D sequence "
                                 f"(got shape {ids_arr.shape})")
            if ids_arr.dtype.kind not in "iu":
                raise ValueError(f"document {k}: ids must be integers (got dtype {ids_arr.dtype})")
            n = len(ids_arr)
            if mask is None:
                mask_parts.append(None)
            else:
                mask_arr = np.asarray(mask).astype(bool, copy=False)
                if mask_arr.shape != ids_arr.shape:
                    raise ValueError(f"document {k}: loss_mask has "
                                     f"{mask_arr.shape[0] if mask_arr.ndim else 0} entries for "
                                     f"{n} ids")
                mask_parts.append(mask_arr)
                all_trained = False
            id_parts.append(ids_arr)
            lens.append(n)
        offset = sum(lens)
        if offset > self.max_length:
            raise ValueError(f"sample of {offset} tokens is longer than max_length="
                             f"{self.max_length}; truncate or split it before add_sample")
        ids_all = id_parts[0] if len(id_parts) == 1 else np.concatenate(id_parts)
        lo, hi = int(ids_all.min()), int(ids_all.max())  # one range check per sample
        if lo < 0 or hi > self.max_id:
            self._raise_out_of_range(id_parts)
        if all_trained:  # pretrain: one span per document, no mask arrays at all
            starts = np.cumsum([0] + lens[:-1])
            spans = np.stack([starts, starts + np.asarray(lens)], axis=1).ravel().astype(np.int32)
            loss_tokens = offset
        else:  # one pass over the sample's mask; spans still end at every document boundary
            full = np.concatenate([np.ones(n, bool) if m is None else m
                                   for m, n in zip(mask_parts, lens)])
            spans = sample_loss_spans(full, lens)
            loss_tokens = int(np.count_nonzero(full))
        flags = [DOC_FLAG_CONTINUES if continues_previous else 0] + [0] * (len(docs) - 1)
        if doc_flags is not None:
            if len(doc_flags) != len(docs) or any(f & ~DOC_FLAG_UNDESIRABLE for f in doc_flags):
                raise ValueError(f"add_sample: doc_flags {list(doc_flags)} must hold one value per "
                                 f"document ({len(docs)}), each 0 or DOC_FLAG_UNDESIRABLE")
            flags = [a | int(b) for a, b in zip(flags, doc_flags)]
        flags = bytes(flags)
        self._shard_for(offset).add(ids_all, lens, spans, flags, loss_tokens, hi)

    def add_block(self, block: SampleBlock) -> None:
        """Append many samples in which every token is trained (`SampleBlock`): the same bytes
        as one `add_sample([(segment, None), ...], continues_previous=...)` per sample, and the
        same shard boundaries, but a few numpy calls per block instead of Python per sample
        (pretrain: ~0.3 ms a sample saved, about a third of the encoder's main thread)."""
        if self._closed:
            raise RuntimeError(f"{self.directory}: add_block after close()/abort()")
        ids, doc_lens = np.asarray(block.ids), np.asarray(block.doc_lens, dtype=np.int64)
        per_sample = np.asarray(block.docs_per_sample, dtype=np.int64)
        continues = np.asarray(block.continues, dtype=bool)
        n = len(per_sample)
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise ValueError(f"add_block: ids must be a 1-D integer array (got shape {ids.shape}, "
                             f"dtype {ids.dtype})")
        if len(continues) != n or int(per_sample.sum()) != len(doc_lens) \
                or int(doc_lens.sum()) != len(ids):
            raise ValueError(f"add_block: inconsistent block ({len(ids)} ids, {len(doc_lens)} "
                             f"segments summing to {int(doc_lens.sum())}, {n} samples of "
                             f"{int(per_sample.sum())} segments, {len(continues)} flags)")
        if n == 0:
            return
        if per_sample.min() < 1 or doc_lens.min() < 1:
            raise ValueError("add_block: every sample needs at least one document, and every "
                             "document segment at least one id")
        sample_lens = block.sample_lens()
        if sample_lens.max() > self.max_length:
            k = int(np.argmax(sample_lens > self.max_length))
            raise ValueError(f"sample {k} of the block has {int(sample_lens[k])} tokens, longer "
                             f"than max_length={self.max_length}; split it before add_block")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi > self.max_id:
            self._raise_out_of_range(np.split(ids, np.cumsum(doc_lens)[:-1]))
        tok_ends = np.cumsum(sample_lens)
        seg_bounds = np.concatenate(([0], np.cumsum(per_sample)))
        flags = np.zeros(len(doc_lens), dtype=np.uint8)
        flags[seg_bounds[:-1][continues]] = DOC_FLAG_CONTINUES
        pos = 0
        while pos < n:
            cur = self._shard_for(int(sample_lens[pos]))   # finishes a full shard, as add_sample
            base = int(tok_ends[pos] - sample_lens[pos])
            room = self.tokens_per_file - cur.num_tokens
            end = max(pos + 1, int(np.searchsorted(tok_ends, base + room, side="right")))
            t0, t1 = base, int(tok_ends[end - 1])
            s0, s1 = int(seg_bounds[pos]), int(seg_bounds[end])
            part = ids[t0:t1]
            cur.add_block(part, doc_lens[s0:s1], per_sample[pos:end], sample_lens[pos:end],
                          flags[s0:s1].tobytes(), int(part.max()))
            pos = end

    def _raise_out_of_range(self, id_parts: list[np.ndarray]) -> None:
        """Name the first document holding an id the dtype cannot store (never wrap)."""
        for k, ids in enumerate(id_parts):
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0:
                raise ValueError(f"document {k}: token id {lo} is negative; ids must be >= 0")
            if hi > self.max_id:
                fix = (f"use --save_dtype {smallest_dtype_for(hi + 1)} (or 'auto')"
                       if hi <= dtype_max_id("int32") else "no token dtype holds it")
                raise ValueError(f"document {k}: token id {hi} does not fit dtype "
                                 f"{self.dtype.name} (max {self.max_id}); {fix}")

    def _shard_for(self, sample_tokens: int) -> _ShardBuilder:
        cur = self._current
        if cur is not None and cur.num_tokens > 0 and \
                cur.num_tokens + sample_tokens > self.tokens_per_file:
            self._shards.append(cur.finish())
            cur = None
        if cur is None:
            cur = _ShardBuilder(self.directory, self.corpus_name, len(self._shards), self.dtype)
            self._current = cur
        return cur

    # -- counts and closing --------------------------------------------------------------------
    @property
    def counts(self) -> dict:
        """Totals so far: `{"samples", "docs", "tokens", "loss_tokens", "shards"}`."""
        parts = self._shards + ([self._current_summary()] if self._current else [])
        return {
            "samples": sum(p["samples"] for p in parts),
            "docs": sum(p["docs"] for p in parts),
            "tokens": sum(p["tokens"] for p in parts),
            "loss_tokens": sum(p["loss_tokens"] for p in parts),
            "shards": len(parts),
        }

    @property
    def shard_tokens(self) -> list[int]:
        """Tokens in each shard so far, the open one last (the roll rule lives in `_shard_for`)."""
        return [s["tokens"] for s in self._shards] + ([self._current.num_tokens]
                                                      if self._current else [])

    def _current_summary(self) -> dict:
        c = self._current
        return {"samples": c.num_samples, "docs": len(c.doc_lens), "tokens": c.num_tokens,
                "loss_tokens": c.loss_tokens}

    def close(self) -> Path:
        """Finish the last shard and write `manifest.json` (last, atomically). Returns the dir."""
        if self._closed:
            return self.directory
        if self._current is not None and self._current.num_samples > 0:
            self._shards.append(self._current.finish())
        elif self._current is not None:
            self._current.discard()
        self._current = None
        fsync_dir(self.directory)
        write_json_atomic(self.directory / MANIFEST_NAME, self._manifest())
        if self._final is not None:
            self._swap_into_place()
        self._closed = True
        return self.directory

    def abort(self) -> None:
        """Drop the shard in progress; no manifest is written, so readers refuse the directory.
        An aborted overwrite deletes its staging directory: the old dataset is untouched."""
        if self._current is not None:
            self._current.discard()
            self._current = None
        if self._final is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory, self._final = self._final, None
        self._closed = True

    def _manifest(self) -> dict:
        totals = self.counts
        totals["max_token_id"] = max((s["max_token_id"] for s in self._shards), default=-1)
        return {
            "format": MANIFEST_FORMAT,
            "format_version": FORMAT_VERSION,
            "corpus_name": self.corpus_name,
            "encode_type": self.encode_type,
            "dtype": self.dtype.name,
            "max_length": self.max_length,
            "tokens_per_file": self.tokens_per_file,
            "packing": self.packing,
            "tokenizer": self.tokenizer_info,
            "totals": totals,
            "shards": self._shards,
            **self.manifest_extra,
            "metadata": self.metadata,
            "created_unix": round(self._started, 3),
            "writer": {"python": sys.version.split()[0], "numpy": np.__version__},
        }

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
