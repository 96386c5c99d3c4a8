"""Memory-mapped reader: O(1) random access to any sample of one or many dataset directories.

Opening reads each `manifest.json` and each shard's 48-byte header (no full scans), and checks
file sizes and header counts against the manifest: 1,000 shards open in well under a second.
Shards are mapped lazily on first access; token arrays are zero-copy views into the mapping, so
RSS grows only with the pages actually touched (the kernel may drop them again), never with the
dataset size. Pickling drops the mappings; they are re-opened lazily in the new process, and also
after a fork (an `os.register_at_fork` hook), which makes datasets safe in DataLoader workers.
"""

from __future__ import annotations

import bisect
import json
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from shardfmt.errors import CorruptShardError, DatasetNotFoundError, IncompleteDatasetError
from shardfmt.protocol import Sample, length_summary, locate
from shardfmt.verify import verify_shard
from shardfmt.spec import (DOC_FLAG_CONTINUES, FORMAT_VERSION, HEADER, INDEX_ARRAYS,
                           MANIFEST_FORMAT, MANIFEST_NAME, OFFSET_ROW_NBYTES, OFFSET_ROW_PAIR,
                           IndexHeader, index_array_offsets, index_nbytes, token_dtype,
                           unpack_header)


_new_sample = tuple.__new__  # NamedTuple's own __new__ costs ~0.6 us more per sample
_SIX_OFFSETS = OFFSET_ROW_PAIR  # rows j and j+1 of sample_offsets: ~0.2 us less than a slice
# Read-only arrays shared by every read of a sample of that length (a sample <= max_length tokens,
# so at most max_length entries of ~100 bytes): an all-True loss mask (pretrain) and the doc_lens
# of a one-document sample. A dict lookup is ~0.05 us; slicing a fresh view costs ~0.3 us each.
_ALL_TRUE: dict[int, np.ndarray] = {}
_ONE_DOC: dict[int, np.ndarray] = {}


def _all_true(n: int) -> np.ndarray:
    """A read-only all-True mask of length n (one array per length, shared)."""
    mask = _ALL_TRUE.get(n)
    if mask is None:
        mask = _ALL_TRUE[n] = np.ones(n, dtype=bool)
        mask.flags.writeable = False
    return mask


def _one_doc(n: int) -> np.ndarray:
    """doc_lens of a one-document sample of n tokens: read-only [n] (int32, as in the index)."""
    lens = _ONE_DOC.get(n)
    if lens is None:
        lens = _ONE_DOC[n] = np.array([n], dtype=INDEX_ARRAYS["doc_lens"][0])
        lens.flags.writeable = False
    return lens


# Every shard with live mappings. A forked child (DataLoader worker) drops them and maps the files
# afresh on first use, instead of checking os.getpid() on every read (~0.1-1 us a call).
_MAPPED: "weakref.WeakSet[_ShardFiles]" = weakref.WeakSet()


def _forget_all_mappings() -> None:
    for shard in list(_MAPPED):
        shard.forget_mappings()
    _MAPPED.clear()


os.register_at_fork(after_in_child=_forget_all_mappings)


@dataclass(eq=False)  # identity equality/hash: shards live in the WeakSet _MAPPED
class _ShardFiles:
    """One shard: paths, the manifest's claims, and (lazily) its mapped arrays."""

    bin_path: Path
    idx_path: Path
    entry: dict
    dtype: np.dtype
    header: IndexHeader | None = None
    arrays: dict | None = field(default=None, repr=False)
    fast: tuple | None = field(default=None, repr=False)  # hot-path views, see open()

    def forget_mappings(self) -> None:
        self.arrays = self.fast = None

    def open(self) -> dict:
        """Map both files (once per process) and return the index arrays plus `tokens`."""
        if self.arrays is not None:
            return self.arrays
        h = self.header
        idx_mm = np.memmap(self.idx_path, dtype=np.uint8, mode="r")
        arrays = {name: np.frombuffer(idx_mm, dtype=dt, count=count, offset=off)
                  for name, (off, count, dt) in index_array_offsets(h).items()}
        arrays["loss_spans"] = arrays["loss_spans"].reshape(-1, 2)
        offsets = arrays["sample_offsets"].reshape(-1, 3)
        arrays["sample_token_offsets"] = offsets[:, 0]  # strided views, for vectorised scans
        arrays["sample_doc_offsets"] = offsets[:, 1]
        arrays["sample_span_offsets"] = offsets[:, 2]
        if h.num_tokens:
            bin_mm = np.memmap(self.bin_path, dtype=np.uint8, mode="r")
            arrays["tokens"] = np.frombuffer(bin_mm, dtype=token_dtype(self.dtype),
                                             count=h.num_tokens)
        else:
            arrays["tokens"] = np.zeros(0, dtype=self.dtype)
        problem = index_problem(arrays, h)  # once per mapping, so reads need no checks
        if problem:
            raise CorruptShardError(f"{self.idx_path}: {problem}")
        # memoryviews index to Python ints in ~40 ns, numpy scalars cost ~10x that: the hot path
        # of __getitem__ reads its six offsets with one struct unpack from the mapped index.
        self.fast = (idx_mm, index_array_offsets(h)["sample_offsets"][0],
                     memoryview(arrays["loss_spans"].reshape(-1)), arrays["doc_lens"],
                     arrays["tokens"])
        self.arrays = arrays
        _MAPPED.add(self)
        return arrays

    def sample(self, j: int) -> Sample:
        """Sample `j` of this shard (0 <= j < num_samples; open() has checked every offset)."""
        fast = self.fast
        if fast is None:
            self.open()
            fast = self.fast
        idx_mm, offsets_at, spans_mv, lens, tokens = fast
        t0, d0, s0, t1, d1, s1 = _SIX_OFFSETS.unpack_from(idx_mm, offsets_at + OFFSET_ROW_NBYTES * j)
        n = t1 - t0
        if s1 - s0 == 1 and spans_mv[2 * s0] == 0 and spans_mv[2 * s0 + 1] == n:
            mask = _ALL_TRUE.get(n)  # pretrain: every token trained; shared, read-only
            if mask is None:
                mask = _all_true(n)
        else:
            mask = np.zeros(n, dtype=bool)
            for k in range(2 * s0, 2 * s1, 2):
                mask[spans_mv[k]:spans_mv[k + 1]] = True
        if d1 - d0 == 1:
            doc_lens = _ONE_DOC.get(n)
            if doc_lens is None:
                doc_lens = _one_doc(n)
        else:
            doc_lens = lens[d0:d1]
        return _new_sample(Sample, (tokens[t0:t1], mask, doc_lens))

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)  # memoryviews and mmaps do not pickle: re-opened lazily
        state["arrays"], state["fast"] = None, None
        return state


def index_problem(arrays: dict, h: IndexHeader) -> str | None:
    """The first sample whose offsets, document lengths or loss spans a read could not trust.

    Vectorised over the whole index (~15 ms per 100k samples, once per process and shard), so that
    `sample()` reads without per-read checks. Checked: every sample's token/doc/span ranges lie
    inside the arrays and do not run backwards; its document lengths sum to its token count; its
    loss spans lie inside it. (`python -m shardfmt verify` checks the rest: checksums, span order,
    manifest totals.)
    """
    tok, doc, spn = (arrays["sample_token_offsets"].astype(np.int64),
                     arrays["sample_doc_offsets"].astype(np.int64),
                     arrays["sample_span_offsets"].astype(np.int64))
    # FORMAT.md: row 0 = (0, 0, 0), row S = (T, D, L); else spans (or segments) belong to no
    # sample, and the per-sample checks below would compare arrays of different lengths
    for name, offs, last in (("token", tok, h.num_tokens), ("document", doc, h.num_docs),
                             ("loss span", spn, h.num_spans)):
        if int(offs[0]) != 0:
            return f"sample 0 starts at {name} offset {int(offs[0])}, not 0"
        if int(offs[-1]) != last:
            return (f"the last sample ends at {name} offset {int(offs[-1])}, not at the "
                    f"header's {name} count {last}")
    outside = np.zeros(h.num_samples, dtype=bool)
    for offs, last in ((tok, h.num_tokens), (doc, h.num_docs), (spn, h.num_spans)):
        outside |= (offs[:-1] < 0) | (offs[:-1] > offs[1:]) | (offs[1:] > last)
    if outside.any():
        j = int(np.flatnonzero(outside)[0])
        return (f"sample {j} has offsets outside the file (tokens {tok[j]}:{tok[j + 1]}, docs "
                f"{doc[j]}:{doc[j + 1]}, spans {spn[j]}:{spn[j + 1]})")
    n = np.diff(tok)
    doc_sums = np.concatenate(([0], np.cumsum(arrays["doc_lens"], dtype=np.int64)))
    bad = np.flatnonzero(doc_sums[doc[1:]] - doc_sums[doc[:-1]] != n)
    if bad.size:
        return f"sample {bad[0]} document lengths do not sum to its {n[bad[0]]} tokens"
    owner = np.repeat(np.arange(h.num_samples), np.diff(spn))
    spans = arrays["loss_spans"].astype(np.int64)
    bad = np.flatnonzero((spans[:, 0] < 0) | (spans[:, 1] < spans[:, 0]) | (spans[:, 1] > n[owner]))
    if bad.size:
        j, (start, end) = int(owner[bad[0]]), spans[bad[0]].tolist()
        return f"sample {j} has loss span {start}:{end} outside its {n[j]} tokens"
    return None


def _read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise DatasetNotFoundError(f"{directory}: no such dataset directory")
    if not path.exists():
        leftovers = sorted(p.name for p in directory.iterdir())[:5]
        raise IncompleteDatasetError(
            f"{directory}: incomplete dataset, no {MANIFEST_NAME} (the write was interrupted or is "
            f"still running; found {leftovers}). Re-run the encoder with --overwrite.")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptShardError(f"{path}: not valid JSON ({e}); re-encode the dataset") from e
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CorruptShardError(f"{path}: not a shardfmt manifest (missing format="
                                f"{MANIFEST_FORMAT!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CorruptShardError(f"{path}: format_version {manifest.get('format_version')} is not "
                                f"{FORMAT_VERSION}; upgrade shardfmt or re-encode")
    return manifest


def _check_shard(shard: _ShardFiles) -> None:
    """Sizes and header counts against the manifest: a few syscalls, no data read."""
    e = shard.entry
    for kind, path in (("bin", shard.bin_path), ("idx", shard.idx_path)):
        if not path.exists():
            raise CorruptShardError(f"{path}: missing shard file listed in the manifest")
        size, want = path.stat().st_size, e["files"][kind]["bytes"]
        if size != want:
            raise CorruptShardError(f"{path}: {size} bytes, the manifest says {want} (truncated "
                                    f"or replaced); run `python -m shardfmt verify` and re-encode")
    with open(shard.idx_path, "rb") as f:
        h = unpack_header(f.read(HEADER.size), path=str(shard.idx_path))
    if h.dtype != shard.dtype.name:
        raise CorruptShardError(f"{shard.idx_path}: header dtype {h.dtype}, manifest says "
                                f"{shard.dtype.name}")
    claims = {"samples": h.num_samples, "docs": h.num_docs, "loss_spans": h.num_spans,
              "tokens": h.num_tokens}
    for key, value in claims.items():
        if e.get(key) != value:
            raise CorruptShardError(f"{shard.idx_path}: header has {key}={value}, the manifest "
                                    f"says {e.get(key)} (files swapped or corrupt)")
    if index_nbytes(h.num_samples, h.num_docs, h.num_spans) != e["files"]["idx"]["bytes"]:
        raise CorruptShardError(f"{shard.idx_path}: size does not match the header's counts")
    if h.num_tokens * shard.dtype.itemsize != e["files"]["bin"]["bytes"]:
        raise CorruptShardError(f"{shard.bin_path}: size does not match the header's "
                                f"{h.num_tokens} tokens of {shard.dtype.name}")
    shard.header = h


class Dataset:
    """Samples of one or more shardfmt dataset directories, concatenated in the order given.

    Implements `shardfmt.protocol.TokenDataset`; open it with `shardfmt.open_dataset`.
    """

    kind = "shardfmt"

    def __init__(self, directories: Sequence[Path]):
        self.directories = [Path(d) for d in directories]
        self.manifests: list[dict] = []
        self._shards: list[_ShardFiles] = []
        for d in self.directories:
            manifest = _read_manifest(d)
            if manifest.get("encode_type") == "preference":  # pairs: shardfmt/preference.py
                from shardfmt.preference import check_preference_manifest
                check_preference_manifest(manifest, path=str(d / MANIFEST_NAME))
            elif manifest.get("encode_type") == "kto":  # unpaired examples: same module
                from shardfmt.preference import check_kto_manifest
                check_kto_manifest(manifest, path=str(d / MANIFEST_NAME))
            self.manifests.append(manifest)
            dtype = np.dtype(manifest["dtype"])
            for entry in manifest["shards"]:
                # "dir" (optional) is relative to the dataset directory: merged datasets point
                # at their parts' shards instead of copying tokens.
                base = Path(os.path.normpath(d / entry["dir"])) if entry.get("dir") else d
                shard = _ShardFiles(base / entry["files"]["bin"]["name"],
                                    base / entry["files"]["idx"]["name"], entry, dtype)
                _check_shard(shard)
                self._shards.append(shard)
        counts = [s.header.num_samples for s in self._shards]
        # starts[k] = global index of shard k's first sample; starts[-1] = total. A Python list:
        # bisect on it costs ~0.3 us per lookup, np.searchsorted ~5 us (call overhead).
        self._starts = [0] + np.cumsum(counts, dtype=np.int64).tolist()

    # -- summary -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._starts[-1]

    @property
    def num_tokens(self) -> int:
        return sum(s.header.num_tokens for s in self._shards)

    @property
    def dtype(self) -> np.dtype:
        """The widest token dtype among the directories."""
        return np.result_type(*[np.dtype(m["dtype"]) for m in self.manifests])

    @property
    def max_token_id(self) -> int:
        return max((s.entry.get("max_token_id", -1) for s in self._shards), default=-1)

    @property
    def manifest(self) -> dict:
        return self.manifests[0]

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    def shards(self) -> list[_ShardFiles]:
        return list(self._shards)

    def sample_lengths(self) -> np.ndarray:
        """Every sample's token count (int64), from the offsets only."""
        parts = [np.diff(s.open()["sample_token_offsets"]) for s in self._shards]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    # -- access --------------------------------------------------------------------------------
    def locate(self, i: int) -> tuple[int, int]:
        """Global index -> (shard number, index inside that shard)."""
        return locate(self._starts, i)

    def __getitem__(self, i: int) -> Sample:
        starts = self._starts
        if type(i) is int and 0 <= i < starts[-1]:  # hot path: ~0.3 us to find the shard
            k = bisect.bisect_right(starts, i) - 1
            return self._shards[k].sample(i - starts[k])
        k, j = self.locate(i)  # numpy ints, negative indices, errors
        return self._shards[k].sample(j)

    def doc_continues(self, i: int) -> np.ndarray:
        """Per segment of sample `i`: True if it continues a document from the previous sample."""
        k, j = self.locate(int(i))
        a = self._shards[k].open()
        d0, d1 = a["sample_doc_offsets"][j:j + 2].tolist()
        return (a["doc_flags"][d0:d1] & DOC_FLAG_CONTINUES).astype(bool)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    @property
    def paths(self) -> list[str]:
        return [str(d) for d in self.directories]

    def summary(self) -> dict:
        """Counts, length percentiles and loss fraction (reads offsets, not tokens)."""
        lengths = self.sample_lengths()
        loss_tokens = sum(s.entry["loss_tokens"] for s in self._shards)
        m = self.manifest
        return {
            "kind": self.kind,
            "paths": self.paths,
            "encode_type": m["encode_type"],
            "dtype": str(self.dtype),
            "max_length": m["max_length"],
            "packing": m["packing"],
            "shards": self.num_shards,
            "samples": len(self),
            "docs": sum(s.header.num_docs for s in self._shards),
            "tokens": self.num_tokens,
            "loss_tokens": loss_tokens,
            "loss_fraction": round(loss_tokens / max(self.num_tokens, 1), 4),
            "fill": round(self.num_tokens / max(len(self) * m["max_length"], 1), 4),
            "max_token_id": self.max_token_id,
            "length": length_summary(lengths),
            "tokenizer": {k: m["tokenizer"].get(k) for k in ("path", "class", "len", "bos_id",
                                                             "eos_id", "pad_id")},
        }

    def verify(self) -> list[str]:
        """Checksums of every file and a structural scan of every index (reads every byte)."""
        return [problem for shard in self._shards for problem in verify_shard(shard)]

    def __repr__(self) -> str:
        return (f"Dataset({[str(d) for d in self.directories]}, samples={len(self)}, "
                f"shards={self.num_shards}, tokens={self.num_tokens})")
