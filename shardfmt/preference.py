"""Preference pairs in shardfmt datasets: no new bytes, a convention recorded in the manifest.

A preference dataset (`encode_type: "preference"`) stores each pair as two consecutive document
segments of one sample: the chosen sequence, then the rejected one (each = prompt + response,
formatted as qa/chat would format it; its loss spans cover the response). A packed sample holds
several whole pairs: segments c0 r0 c1 r1 ... A pair is never split across samples, so a sample
always has an even number of segments. The byte layout is format version 1 unchanged; the manifest
says how to read the segments:

    "encode_type": "preference",
    "preference": {"layout": "pairs", "segments_per_pair": 2, "order": ["chosen", "rejected"],
                   "sequence_max_length": 512, "pairs": 300}

A reader that knows nothing of pairs still reads valid samples (each sequence is its own document,
so packing-aware attention never lets chosen and rejected see each other).

>>> ds = open_dataset("out/dpo")                                  # doctest: +SKIP
>>> [(p.chosen.input_ids, p.rejected.input_ids) for p in read_pairs(ds, 0)]
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from shardfmt.errors import CorruptShardError
from shardfmt.reader import Sample

PREFERENCE_ENCODE_TYPE = "preference"
PAIR_ORDER = ("chosen", "rejected")


class Pair(NamedTuple):
    chosen: Sample    # one document: input_ids, loss_mask, doc_lens == [len]
    rejected: Sample


def preference_manifest_entry(*, sequence_max_length: int, pairs: int) -> dict:
    """The manifest's "preference" record (the writer stores it at the top level)."""
    return {"layout": "pairs", "segments_per_pair": 2, "order": list(PAIR_ORDER),
            "sequence_max_length": int(sequence_max_length), "pairs": int(pairs)}


def is_preference(manifest: dict | None) -> bool:
    """True if `manifest` describes a dataset of preference pairs."""
    return bool(manifest) and manifest.get("encode_type") == PREFERENCE_ENCODE_TYPE


def check_preference_manifest(manifest: dict, *, path: str) -> None:
    """Refuse a manifest that claims pairs in a layout this reader does not know (a
    CorruptShardError, like an unknown format_version: the CLI's exit 1)."""
    entry = manifest.get("preference")
    if not isinstance(entry, dict) or entry.get("layout") != "pairs" or \
            entry.get("segments_per_pair") != 2 or list(entry.get("order", [])) != list(PAIR_ORDER):
        raise CorruptShardError(f"{path}: encode_type 'preference' but the manifest's 'preference' record "
                         f"is {entry!r}; this reader knows layout 'pairs' (2 segments: chosen, "
                         f"rejected). Re-encode with this version of the encoder.")


def split_pairs(sample: Sample, *, where: str = "sample") -> list[Pair]:
    """A pair sample -> its pairs, in order (zero-copy views of the sample's arrays)."""
    lens = np.asarray(sample.doc_lens, dtype=np.int64)
    if len(lens) % 2:
        raise ValueError(f"{where}: {len(lens)} document segments, not a whole number of "
                         f"(chosen, rejected) pairs; is this a preference dataset?")
    ends = np.cumsum(lens).tolist()
    starts = [0] + ends[:-1]
    docs = [Sample(sample.input_ids[a:b], sample.loss_mask[a:b], lens[k:k + 1].astype(np.int32))
            for k, (a, b) in enumerate(zip(starts, ends))]
    return [Pair(docs[k], docs[k + 1]) for k in range(0, len(docs), 2)]


def read_pairs(dataset, i: int) -> list[Pair]:
    """The pairs of sample `i` of a preference dataset (one pair, or several when packed)."""
    return split_pairs(dataset[i], where=f"sample {i}")


def pair_counts(dataset) -> np.ndarray:
    """Number of pairs in every sample (from the index only); a concatenation (a --data_path
    mix) is read part by part."""
    counts = [np.diff(shard.open()["sample_doc_offsets"]) // 2 for shard in _shards(dataset)]
    return np.concatenate(counts).astype(np.int64) if counts else np.zeros(0, np.int64)


def sequence_lengths(dataset) -> np.ndarray:
    """The length of every sequence (chosen and rejected alike) of a pair dataset, from the index."""
    lens = [shard.open()["doc_lens"] for shard in _shards(dataset)]
    return np.concatenate(lens).astype(np.int64) if lens else np.zeros(0, np.int64)


def _shards(dataset) -> list:
    if hasattr(dataset, "parts"):  # shardfmt.ConcatDataset
        return [shard for part in dataset.parts for shard in _shards(part)]
    return list(dataset.shards())


# -- unpaired feedback (KTO): encode_type "kto" --------------------------------------------------
# Each example (prompt + completion, formatted as qa/chat; loss spans on the completion) is ONE
# document segment; a packed sample holds several whole examples. Its label is bit 1 of the
# segment's doc_flags (DOC_FLAG_UNDESIRABLE set = label False): the byte layout is version 1
# unchanged, and the label follows the segment through packing, shard rolling and merging.
KTO_ENCODE_TYPE = "kto"


class Example(NamedTuple):
    sample: Sample      # one document: input_ids, loss_mask (the completion), doc_lens == [len]
    desirable: bool


def kto_manifest_entry(*, sequence_max_length: int, desirable: int, undesirable: int) -> dict:
    """The manifest's "kto" record."""
    return {"layout": "unpaired", "label": "doc_flags bit 1 set = undesirable",
            "sequence_max_length": int(sequence_max_length), "examples": desirable + undesirable,
            "desirable": int(desirable), "undesirable": int(undesirable)}


def is_kto(manifest: dict | None) -> bool:
    """True if `manifest` describes a dataset of unpaired (KTO) examples."""
    return bool(manifest) and manifest.get("encode_type") == KTO_ENCODE_TYPE


def check_kto_manifest(manifest: dict, *, path: str) -> None:
    """Refuse a manifest that claims unpaired examples in a layout this reader does not know."""
    entry = manifest.get("kto")
    if not isinstance(entry, dict) or entry.get("layout") != "unpaired":
        raise CorruptShardError(f"{path}: encode_type 'kto' but the manifest's 'kto' record is "
                         f"{entry!r}; this reader knows layout 'unpaired' (one example per "
                         f"segment, label in doc_flags bit 1). Re-encode with this encoder.")


def segment_desirable(dataset, i: int) -> np.ndarray:
    """Per segment of sample `i` of a kto dataset: its label (True = desirable), from the index.
    Works on a `shardfmt.Dataset` and on concatenations of them (a --data_path mix)."""
    from shardfmt.spec import DOC_FLAG_UNDESIRABLE
    i = int(i)
    if hasattr(dataset, "parts"):  # ConcatDataset
        k, j = dataset.locate(i)
        return segment_desirable(dataset.parts[k], j)
    k, j = dataset.locate(i)
    a = dataset.shards()[k].open()
    d0, d1 = a["sample_doc_offsets"][j:j + 2].tolist()
    return (a["doc_flags"][d0:d1] & DOC_FLAG_UNDESIRABLE) == 0


def read_examples(dataset, i: int) -> list[Example]:
    """The examples of sample `i` of a kto dataset (one, or several when packed), with labels."""
    sample = dataset[int(i)]
    labels = segment_desirable(dataset, i)
    ends = np.cumsum(sample.doc_lens).tolist()
    starts = [0] + ends[:-1]
    return [Example(Sample(sample.input_ids[a:b], sample.loss_mask[a:b],
                           np.array([b - a], np.int32)), bool(ok))
            for a, b, ok in zip(starts, ends, labels)]
