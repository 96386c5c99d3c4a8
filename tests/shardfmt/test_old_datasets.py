"""Datasets written by an older encoder (tests/fixtures/format_v1, committed bytes) still open and
read back exactly, and are not mistaken for preference datasets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shardfmt import open_dataset
from shardfmt.preference import is_preference

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "format_v1"
EXPECTED = json.loads((FIXTURES / "expected_samples.json").read_text())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_v1_dataset_opens_and_reads_back(name):
    ds = open_dataset(FIXTURES / name)
    assert len(ds) == len(EXPECTED[name])
    for sample, want in zip(ds, EXPECTED[name]):
        assert sample.input_ids.tolist() == want["input_ids"]
        assert sample.loss_mask.astype(int).tolist() == want["loss_mask"]
        assert sample.doc_lens.tolist() == want["doc_lens"]
    assert not is_preference(ds.manifest)


def test_v1_dataset_verifies():
    from shardfmt.verify import verify_dataset
    for name in EXPECTED:
        assert not verify_dataset(open_dataset(FIXTURES / name))
