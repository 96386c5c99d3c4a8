"""The one dataset interface behind every kind of token data, and concatenation of datasets.

A *token dataset* is anything below: a shardfmt directory (`shardfmt.reader.Dataset`), a Megatron
`.bin/.idx` prefix (`shardfmt.megatron.MegatronDataset`), or several of them end to end
(`ConcatDataset`). The trainer and the CLIs use only this interface, so they never care which
kind they got. A new kind (e.g. preference pairs) implements the same members and adds its own
fields to `Sample`-like records; `kind` tells them apart where it matters.
"""

from __future__ import annotations

import bisect
import operator
from typing import Iterator, NamedTuple, Protocol, Sequence, runtime_checkable

import numpy as np


class Sample(NamedTuple):
    input_ids: np.ndarray  # token ids in the dataset's dtype (zero-copy view; cast before torch)
    loss_mask: np.ndarray  # bool, True where the token is trained
    doc_lens: np.ndarray   # int32 lengths of the document segments, summing to len(input_ids)


@runtime_checkable
class TokenDataset(Protocol):
    """What every dataset kind provides (all cheap unless stated)."""

    kind: str  # "shardfmt", "megatron", "concat"

    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> Sample: ...
    def doc_continues(self, i: int) -> np.ndarray:
        """Per segment of sample i: True if it continues a document of the previous sample."""
    def sample_lengths(self) -> np.ndarray:
        """Every sample's token count, int64 (from the index, no token read)."""
    @property
    def num_tokens(self) -> int: ...
    @property
    def max_token_id(self) -> int: ...
    @property
    def dtype(self) -> np.dtype: ...
    @property
    def manifests(self) -> list[dict]:
        """shardfmt manifests behind the data (tokenizer identity, template); [] for Megatron."""
    @property
    def paths(self) -> list[str]:
        """The directories / prefixes the data was opened from."""
    def summary(self) -> dict:
        """Counts and length percentiles for `python -m shardfmt inspect` (JSON-friendly)."""
    def verify(self) -> list[str]:
        """Every problem a full check finds, each naming the file (reads every byte)."""


def locate(starts: list[int], i: int) -> tuple[int, int]:
    """(part k, index inside part k) of global index `i` (negative counts from the end), given
    `starts[k]` = global index of part k's first item and `starts[-1]` = the total."""
    i = operator.index(i)
    n = starts[-1]
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(f"sample index {i} out of range for a dataset of {n} samples")
    k = bisect.bisect_right(starts, i) - 1
    return k, i - starts[k]


def length_summary(lengths: np.ndarray) -> dict:
    """min, p50/p90/p99 and max of sample lengths (zeros for an empty dataset)."""
    if not len(lengths):
        return {"min": 0, "max": 0}
    pct = {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 99)}
    return {"min": int(lengths.min()), **pct, "max": int(lengths.max())}


class ConcatDataset:
    """Datasets of any kind, end to end in the order given (sample i of part 1 follows the last
    sample of part 0). `starts[k]` is the global index of part k's first sample."""

    kind = "concat"

    def __init__(self, parts: Sequence[TokenDataset]):
        if not parts:
            raise ValueError("ConcatDataset: give at least one dataset")
        self.parts = list(parts)
        # A Python list: bisect on it costs ~0.3 us per lookup, np.searchsorted ~5 us.
        self.starts = [0] + np.cumsum([len(p) for p in self.parts], dtype=np.int64).tolist()

    def __len__(self) -> int:
        return self.starts[-1]

    def locate(self, i: int) -> tuple[int, int]:
        """Global index -> (part number, index inside that part)."""
        return locate(self.starts, i)

    def __getitem__(self, i: int) -> Sample:
        starts = self.starts
        if type(i) is int and 0 <= i < starts[-1]:
            k = bisect.bisect_right(starts, i) - 1
            return self.parts[k][i - starts[k]]
        k, j = self.locate(i)
        return self.parts[k][j]

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]

    def doc_continues(self, i: int) -> np.ndarray:
        k, j = self.locate(i)
        cont = self.parts[k].doc_continues(j)
        if j == 0 and len(cont):  # a part's first sample continues nothing of the part before
            cont = cont.copy()
            cont[0] = False
        return cont

    def sample_lengths(self) -> np.ndarray:
        return np.concatenate([p.sample_lengths() for p in self.parts])

    @property
    def num_tokens(self) -> int:
        return sum(p.num_tokens for p in self.parts)

    @property
    def max_token_id(self) -> int:
        return max(p.max_token_id for p in self.parts)

    @property
    def dtype(self) -> np.dtype:
        return np.result_type(*[p.dtype for p in self.parts])

    @property
    def manifests(self) -> list[dict]:
        return [m for p in self.parts for m in p.manifests]

    @property
    def manifest(self) -> dict | None:
        manifests = self.manifests
        return manifests[0] if manifests else None

    @property
    def paths(self) -> list[str]:
        return [path for p in self.parts for path in p.paths]

    def summary(self) -> dict:
        lengths = self.sample_lengths()
        return {"kind": self.kind, "paths": self.paths, "samples": len(self),
                "tokens": self.num_tokens, "dtype": str(self.dtype),
                "max_token_id": self.max_token_id, "length": length_summary(lengths),
                "parts": [p.summary() for p in self.parts]}

    def verify(self) -> list[str]:
        return [problem for p in self.parts for problem in p.verify()]

    def __repr__(self) -> str:
        return f"ConcatDataset({self.parts!r})"
