"""Full verification of a dataset: checksums of every file and a structural scan of every index.

`open_dataset` only checks sizes and headers (cheap, O(shards)); this reads every byte once
(~1-2 GB/s for the hash, so a 10 GB dataset takes seconds to tens of seconds). Megatron prefixes
carry no checksums: their header, file sizes and every index entry are checked instead
(`MegatronDataset.verify`). `verify_dataset` works on any kind (`shardfmt.protocol`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import xxhash

from shardfmt.errors import CorruptShardError

if TYPE_CHECKING:  # types only: the reader imports this module
    from shardfmt.protocol import TokenDataset
    from shardfmt.reader import _ShardFiles

_CHUNK = 8 << 20


def file_xxh3(path: Path) -> str:
    """Streaming xxh3-64 hex digest of a file (8 MB reads, constant memory)."""
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _check_index_structure(shard: "_ShardFiles") -> list[str]:
    """Every invariant of FORMAT.md that the header alone cannot prove (open() has already checked
    what reads rely on: offsets inside the arrays, document lengths summing to each sample's
    length, loss spans inside their sample)."""
    a, h, e, where = shard.open(), shard.header, shard.entry, str(shard.idx_path)
    problems = []
    tok, doc, spn = a["sample_token_offsets"], a["sample_doc_offsets"], a["sample_span_offsets"]
    sample_lens = np.diff(tok)
    if np.any(a["doc_lens"] <= 0):
        problems.append(f"{where}: a document segment has length <= 0")
    if np.any(np.diff(doc) == 0):
        problems.append(f"{where}: a sample has no document segments")
    spans = a["loss_spans"].astype(np.int64)
    if h.num_spans:
        owner = np.repeat(np.arange(h.num_samples), np.diff(spn))
        starts, ends = spans[:, 0], spans[:, 1]
        if np.any(starts < 0) or np.any(ends <= starts) or np.any(ends > sample_lens[owner]):
            problems.append(f"{where}: a loss span is empty or outside its sample")
        same = owner[1:] == owner[:-1]
        if np.any(starts[1:][same] < ends[:-1][same]):
            problems.append(f"{where}: loss spans overlap or are unsorted")
        loss_tokens = int((ends - starts).sum())
    else:
        loss_tokens = 0
    if loss_tokens != e.get("loss_tokens"):
        problems.append(f"{where}: {loss_tokens} loss tokens, the manifest says "
                        f"{e.get('loss_tokens')}")
    if h.num_tokens:
        t = a["tokens"]
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi != e.get("max_token_id"):
            problems.append(f"{shard.bin_path}: token ids span {lo}..{hi}, the manifest says "
                            f"max {e.get('max_token_id')}")
    return problems


def verify_shard(shard: "_ShardFiles") -> list[str]:
    """Checksums of one shard's files against its manifest entry, then its index structure."""
    problems: list[str] = []
    for kind, path in (("bin", shard.bin_path), ("idx", shard.idx_path)):
        want = shard.entry["files"][kind]["xxh3_64"]
        got = file_xxh3(path)
        if got != want:
            problems.append(f"{path}: checksum {got} != manifest {want} (corrupt file)")
    try:
        problems += _check_index_structure(shard)
    except CorruptShardError as err:  # open() refused it; the message names the file
        problems.append(str(err))
    except (ValueError, IndexError) as err:
        problems.append(f"{shard.idx_path}: unreadable index ({err})")
    return problems


def verify_dataset(ds: "TokenDataset") -> list[str]:
    """Problems found (empty list = the dataset is intact), each naming the file. Any kind; a
    concatenation is checked part by part (each part's own manifest: pairs, doc flags, KTO)."""
    if hasattr(ds, "parts"):  # ConcatDataset (shardfmt/protocol.py)
        return [problem for part in ds.parts for problem in verify_dataset(part)]
    problems = ds.verify()
    manifest = getattr(ds, "manifest", None)
    if manifest and manifest.get("encode_type") == "preference":  # shardfmt/preference.py
        for shard in ds.shards():
            problems += _check_pairs(shard)
    if manifest and hasattr(ds, "shards"):
        problems += _check_doc_flags(ds)
    return problems


def _check_doc_flags(ds) -> list[str]:
    """doc_flags use only their defined bits: bit 0 anywhere, bit 1 (undesirable) only in kto
    datasets, where the number of undesirable segments equals the manifest's "kto" count."""
    from shardfmt.spec import DOC_FLAG_CONTINUES, DOC_FLAG_UNDESIRABLE
    kto = ds.manifest.get("encode_type") == "kto"
    allowed = DOC_FLAG_CONTINUES | (DOC_FLAG_UNDESIRABLE if kto else 0)
    problems, undesirable = [], 0
    for shard in ds.shards():
        try:
            flags = np.asarray(shard.open()["doc_flags"])
        except (CorruptShardError, ValueError):
            continue  # reported above
        bad = np.flatnonzero(flags & np.uint8(0xFF ^ allowed))
        if bad.size:
            problems.append(f"{shard.idx_path}: document segment {int(bad[0])} has doc_flags "
                            f"{int(flags[bad[0]])}; allowed bits here: {allowed:#04b}")
        undesirable += int(np.count_nonzero(flags & DOC_FLAG_UNDESIRABLE))
    want = ds.manifest.get("kto", {}).get("undesirable") if kto else None
    if kto and want != undesirable and len(ds.manifests) == 1:
        problems.append(f"{ds.paths[0]}: {undesirable} undesirable examples in the index, the "
                        f"manifest's 'kto' record says {want}")
    return problems


def _check_pairs(shard: _ShardFiles) -> list[str]:
    """A preference shard: every sample holds whole (chosen, rejected) pairs."""
    try:
        per_sample = np.diff(shard.open()["sample_doc_offsets"])
    except (CorruptShardError, ValueError):
        return []  # reported above
    odd = np.flatnonzero(per_sample % 2)
    if odd.size:
        return [f"{shard.idx_path}: sample {int(odd[0])} has {int(per_sample[odd[0]])} segments, "
                f"not whole (chosen, rejected) pairs"]
    return []
