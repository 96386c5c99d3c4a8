"""What a dataset path names, and `open_dataset`: one entry point for every kind of token data.

A path is one of:
  * a shardfmt dataset directory   OUT/CORPUS with manifest.json (what the encoder writes);
  * a Megatron-LM prefix           PREFIX, with PREFIX.bin and PREFIX.idx beside it (the file names
                                   PREFIX.idx / PREFIX.bin are accepted too);
  * a directory of Megatron prefixes  a directory without manifest.json whose *.idx files are
                                   Megatron MMIDIDX indexes (datatrove / NeMo Curator output):
                                   every pair in it, in file-name order (not recursive).
Opening checks sizes and headers only (O(files)); `verify()` reads everything.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from shardfmt.errors import DatasetNotFoundError
from shardfmt.megatron import MegatronDataset
from shardfmt.protocol import ConcatDataset, TokenDataset
from shardfmt.reader import Dataset
from shardfmt.spec import MANIFEST_NAME, is_megatron_index

SHARDFMT, MEGATRON, MEGATRON_DIR = "shardfmt", "megatron", "megatron_dir"


def _megatron_prefix(path: Path) -> Path | None:
    """PREFIX for `path` = PREFIX, PREFIX.idx or PREFIX.bin when PREFIX.idx exists; else None."""
    text = os.fspath(path)
    if text.endswith((".idx", ".bin")):
        text = text[:-4]
    return Path(text) if Path(text + ".idx").is_file() else None


def megatron_prefixes_in(directory: Path) -> list[Path]:
    """The Megatron prefixes of a directory's MMIDIDX `*.idx` files, sorted by name."""
    return sorted(p.with_suffix("") for p in directory.glob("*.idx")
                  if p.is_file() and is_megatron_index(str(p)))


def path_kind(path: str | os.PathLike) -> str:
    """SHARDFMT, MEGATRON or MEGATRON_DIR; DatasetNotFoundError says what was expected.

    A directory without manifest.json and without Megatron indexes counts as SHARDFMT, so that
    opening it reports the unfinished encode (IncompleteDatasetError)."""
    path = Path(path)
    if path.is_dir():
        if (path / MANIFEST_NAME).is_file() or not megatron_prefixes_in(path):
            return SHARDFMT
        return MEGATRON_DIR
    if _megatron_prefix(path) is not None:
        return MEGATRON
    raise DatasetNotFoundError(
        f"{path}: no such dataset. Give a dataset directory (with manifest.json), a Megatron "
        f"prefix (PREFIX.bin + PREFIX.idx beside it; found no {path}.idx), or a directory of "
        f"Megatron .bin/.idx pairs")


def path_problem(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be opened, from a few stat calls (no data read); None if it looks fine.
    Used to validate command-line flags before anything heavy starts."""
    try:
        kind = path_kind(path)
    except DatasetNotFoundError as err:
        return str(err)
    p = Path(path)
    if kind == SHARDFMT and not (p / MANIFEST_NAME).is_file():
        return (f"{p}: no {MANIFEST_NAME} (an unfinished or failed encode; re-run the encoder, a "
                f"dataset is complete only with its manifest)")
    if kind == MEGATRON:
        prefix = _megatron_prefix(p)
        if not Path(f"{prefix}.bin").is_file():
            return f"{prefix}.bin: missing (the Megatron prefix {prefix} needs .bin and .idx)"
    return None


def open_source(path: str | os.PathLike) -> TokenDataset:
    """One path of any kind (see the module docstring) as a token dataset."""
    kind = path_kind(path)
    if kind == SHARDFMT:
        return Dataset([Path(path)])
    if kind == MEGATRON:
        return MegatronDataset(_megatron_prefix(Path(path)))
    parts = [MegatronDataset(p) for p in megatron_prefixes_in(Path(path))]
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)


def open_dataset(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> TokenDataset:
    """Open one dataset path or several (concatenated, in order), of any kind.

    A path repeated in the list is read that many times (each of its samples appears once per
    repetition in an epoch: up-sampling by repetition). For weighted mixing see shardfmt.mixing.

    >>> ds = open_dataset("out/demo")          # doctest: +SKIP
    >>> s = ds[0]; s.input_ids, s.loss_mask, s.doc_lens
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise ValueError("open_dataset: give at least one dataset path")
    parts: list[TokenDataset] = []
    for p in paths:
        if path_kind(p) == SHARDFMT and parts and isinstance(parts[-1], Dataset):
            parts[-1] = Dataset(parts[-1].directories + [Path(p)])  # one reader, as before
        else:
            parts.append(open_source(p))
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)
