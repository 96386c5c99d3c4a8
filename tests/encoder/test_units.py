"""Pure-Python pieces: packing, chunking, truncation, plugin row checks, dtype choice."""

from __future__ import annotations

import random

import numpy as np
import pytest

from encoder.packing import PretrainChunker, best_fit_decreasing, pack_windows
from encoder.plugins import check_row, parse_kv_args, part_bounds
from encoder.tokenizer_policy import choose_dtype
from encoder.truncation import truncate


def test_bfd_places_every_item_once_within_capacity_and_is_deterministic():
    rng = random.Random(0)
    lengths = [rng.randint(1, 700) for _ in range(3000)]
    bins = best_fit_decreasing(lengths, capacity=2048)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 2048 for b in bins)
    assert bins == best_fit_decreasing(lengths, capacity=2048)
    fill = sum(lengths) / (len(bins) * 2048)
    assert fill > 0.99


def test_bfd_is_best_fit_not_worst_fit():
    # 6 goes into the bin with 4 free (fullest that fits), leaving the 5-free bin for the 5
    assert best_fit_decreasing([10, 6, 5, 6, 5], capacity=16) == [[0, 1], [2, 3, 4]]


def test_drain_sparsest_reaches_the_lower_bound():
    from encoder.packing import drain_sparsest
    lengths = [7, 6, 4, 3]            # BFD: [7,3] [6,4] -> already optimal
    assert len(drain_sparsest(best_fit_decreasing(lengths, capacity=10), lengths,
                              capacity=10)) == 2
    bins = drain_sparsest([[0, 1], [2, 3], [4]], [6, 3, 5, 4, 1], capacity=10)
    assert bins == [[0, 1, 4], [2, 3]]
    rng = random.Random(3)
    for _ in range(20):
        lens = [rng.randint(20, 400) for _ in range(200)]
        bins = drain_sparsest(best_fit_decreasing(lens, capacity=1024), lens, capacity=1024)
        assert sorted(i for b in bins for i in b) == list(range(200))
        assert all(sum(lens[i] for i in b) <= 1024 for b in bins)


def test_pack_windows_bounds_the_window():
    docs = [(np.arange(n), np.ones(n, bool)) for n in [3, 3, 3, 3, 3, 3]]
    samples = list(pack_windows(docs, capacity=9, window=2))
    assert [len(s) for s in samples] == [2, 2, 2]


@pytest.mark.parametrize("doc_lens,max_length", [([4, 4], 4), ([3, 5], 4), ([8], 4), ([2, 2], 4),
                                                  ([1, 1, 1, 1, 1, 1, 1, 1], 4)])
def test_chunker_exact_multiple_gives_full_samples_only(doc_lens, max_length):
    chunker = PretrainChunker(max_length=max_length)
    stream = np.arange(sum(doc_lens))
    samples, pos = [], 0
    for n in doc_lens:
        samples += chunker.push(stream[pos:pos + n])
        pos += n
    assert chunker.finish() is None                 # no remainder, no empty / oversized sample
    assert all(sum(len(s) for s in segs) == max_length for segs, _ in samples)
    joined = np.concatenate([s for segs, _ in samples for s in segs])
    assert joined.tolist() == stream.tolist()


def test_chunker_continuation_flags_and_remainder():
    chunker = PretrainChunker(max_length=4)
    out = chunker.push(np.arange(6)) + chunker.push(np.arange(10, 13))
    assert [(len(segs), cont) for segs, cont in out] == [(1, False), (2, True)]
    segs, cont = chunker.finish()
    assert [s.tolist() for s in segs] == [[12]] and cont is True


def test_truncation_modes():
    ids, mask = np.arange(10), np.array([0] * 6 + [1] * 4, bool)
    assert truncate(ids, mask, max_length=8, mode="drop", keep_prefix=1)[2] == "dropped"
    r_ids, r_mask, status = truncate(ids, mask, max_length=8, mode="right", keep_prefix=1)
    assert status == "truncated" and r_ids.tolist() == list(range(8)) and r_mask.sum() == 2
    l_ids, l_mask, status = truncate(ids, mask, max_length=8, mode="prompt_left", keep_prefix=1)
    assert status == "truncated" and l_ids.tolist() == [0, 3, 4, 5, 6, 7, 8, 9] and l_mask.sum() == 4
    assert truncate(ids, mask, max_length=4, mode="prompt_left", keep_prefix=1)[2] == "dropped"
    assert truncate(ids, mask, max_length=10, mode="drop", keep_prefix=1)[2] == "ok"


@pytest.mark.parametrize("row,problem", [
    ({"q": "x"}, "key 'a' is missing"),
    ({"q": "x", "a": "  "}, "'a' is empty"),
    ({"q": 1, "a": "y"}, "'q' must be str"),
    ("text", "rows must be dicts"),
])
def test_check_row_qa_problems(row, problem):
    with pytest.raises(ValueError, match=problem):
        check_row(row, encode_type="qa")


def test_check_row_chat_order_and_pretrain_type():
    with pytest.raises(ValueError, match="does not end with an assistant"):
        check_row({"messages": [{"role": "user", "content": "hi"}]}, encode_type="chat")
    with pytest.raises(ValueError, match="expected 'user'"):
        check_row({"messages": [{"role": "assistant", "content": "hi"}]}, encode_type="chat")
    with pytest.raises(ValueError, match="must be str"):
        check_row({"text": "x"}, encode_type="pretrain")


def test_dtype_choice():
    assert choose_dtype("auto", vocab_size=50257) == "uint16"
    assert choose_dtype("auto", vocab_size=151669) == "int32"
    assert choose_dtype("auto", vocab_size=65536) == "uint16"
    assert choose_dtype("int16", vocab_size=32000) == "int16"
    with pytest.raises(ValueError, match=r"151669 tokens.*--save_dtype int32"):
        choose_dtype("int16", vocab_size=151669)
    with pytest.raises(ValueError, match=r"32769 tokens \(incl. 2 added\)"):
        choose_dtype("int16", vocab_size=32769, num_added=2)


def test_small_helpers():
    assert parse_kv_args(["a=1", "b=x=y"]) == {"a": "1", "b": "x=y"}
    with pytest.raises(ValueError, match="key=value"):
        parse_kv_args(["novalue"])
    assert [part_bounds(i, 4, 10) for i in range(4)] == [(0, 2), (2, 5), (5, 7), (7, 10)]


@pytest.mark.parametrize("seed", range(4))
def test_chunker_push_block_equals_push_batch(seed):
    """The bulk pretrain path (push_block -> SampleBlock) cuts exactly the samples, segments and
    continuation flags of push_batch, across batches, including exact multiples of max_length."""
    rng = np.random.default_rng(seed)
    max_length = int(rng.integers(3, 40))
    by_batch = PretrainChunker(max_length=max_length)
    by_block = PretrainChunker(max_length=max_length)
    for _ in range(12):
        lens = rng.integers(1, 3 * max_length, size=int(rng.integers(1, 30)))
        if rng.random() < 0.3:   # documents that end exactly on sample boundaries
            lens = np.full(int(rng.integers(1, 5)), max_length)
        offsets = np.concatenate(([0], np.cumsum(lens)))
        ids = rng.integers(0, 1000, size=int(offsets[-1]))
        expected = by_batch.push_batch(ids, offsets)
        block = by_block.push_block(ids, offsets)
        if not expected:
            assert block is None
            continue
        segs = np.split(block.ids, np.cumsum(block.doc_lens)[:-1])
        per = np.split(np.arange(len(segs)), np.cumsum(block.docs_per_sample)[:-1])
        got = [([segs[k].tolist() for k in ks], bool(c)) for ks, c in zip(per, block.continues)]
        assert got == [([s.tolist() for s in ss], c) for ss, c in expected]
    a, b = by_batch.finish(), by_block.finish()
    assert (a is None) == (b is None)
    if a is not None:
        assert [s.tolist() for s in a[0]] == [s.tolist() for s in b[0]] and a[1] == b[1]
