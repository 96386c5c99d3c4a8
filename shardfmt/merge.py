"""Join datasets encoded in parts (`encoder --part I/N`) into one, without rewriting tokens.

The merged directory holds only a manifest whose shard entries point into the part directories
(`"dir": "../part0/corpus"`, relative, so the whole tree can be moved together). Samples read in
part order: part 0's samples, then part 1's, ...
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from shardfmt.errors import OutputExistsError, UsageError
from shardfmt.reader import Dataset
from shardfmt.spec import MANIFEST_NAME
from shardfmt.writer import write_json_atomic

# Fields that must agree between parts; anything else (stats, command line) is kept per part.
_MUST_MATCH = ("format_version", "encode_type", "dtype", "max_length", "packing")


def merge_datasets(part_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
                   overwrite: bool = False) -> Path:
    """Write `out_dir/manifest.json` covering every shard of `part_dirs`, in order.

    >>> merge_datasets(["p0/c", "p1/c"], "all/c")          # doctest: +SKIP
    """
    parts = [Path(p) for p in part_dirs]
    out = Path(out_dir)
    ds = Dataset(parts)  # shardfmt directories only; checks manifests, sizes, headers
    first = ds.manifests[0]
    for path, m in zip(parts, ds.manifests):
        for key in _MUST_MATCH:
            if m.get(key) != first.get(key):
                raise UsageError(f"{path}: {key}={m.get(key)!r} differs from {parts[0]}'s "
                                 f"{first.get(key)!r}; only parts of one encoding can be merged")
        if m["tokenizer"].get("vocab_hash") != first["tokenizer"].get("vocab_hash"):
            raise UsageError(f"{path}: encoded with a different tokenizer than {parts[0]}")
    if (out / MANIFEST_NAME).exists() and not overwrite:
        raise OutputExistsError(f"{out} already holds a dataset; pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for path, m in zip(parts, ds.manifests):
        for entry in m["shards"]:
            base = path / entry["dir"] if entry.get("dir") else path
            shards.append({**entry, "dir": os.path.relpath(base.resolve(), out.resolve())})
    totals = {k: sum(m["totals"][k] for m in ds.manifests)
              for k in ("samples", "docs", "tokens", "loss_tokens")}
    totals["shards"] = len(shards)
    totals["max_token_id"] = max(m["totals"]["max_token_id"] for m in ds.manifests)
    manifest = {**first, "corpus_name": out.name, "shards": shards, "totals": totals,
                "metadata": {"merged_from": [str(p) for p in parts],
                             "parts": [m.get("metadata", {}) for m in ds.manifests]}}
    if "preference" in first:  # pair datasets: the pair count covers every part
        manifest["preference"] = {**first["preference"], "pairs": totals["docs"] // 2}
    if "kto" in first:  # unpaired examples: the label counts cover every part
        counts = {k: sum(m["kto"][k] for m in ds.manifests)
                  for k in ("examples", "desirable", "undesirable")}
        manifest["kto"] = {**first["kto"], **counts}
    write_json_atomic(out / MANIFEST_NAME, manifest)
    return out
