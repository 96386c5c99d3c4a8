"""Megatron-LM MMIDIDX interop: read megatron-core's files, write files megatron-core reads.

The interop tests use megatron-core's own IndexedDataset / IndexedDatasetBuilder (dev extra) and
skip when it is absent; the corruption and round-trip tests need numpy only.
"""

from __future__ import annotations

import os
import pickle
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest

from shardfmt import CorruptShardError, ShardWriter, open_dataset
from shardfmt.megatron import (MEGATRON_HEADER, MEGATRON_MAGIC, export_megatron,
                               megatron_index_nbytes, open_megatron)

TOK_INFO = {"len": 70000, "vocab_hash": "test"}


@pytest.fixture(scope="module")
def mcore():
    """megatron.core.datasets.indexed_dataset, or skip (its import takes ~10 s: once per module)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Transformer Engine and Apex are not installed"
        return pytest.importorskip(
            "megatron.core.datasets.indexed_dataset",
            reason="megatron-core not installed (pip install megatron-core; in the dev extra)")


def random_docs(rng, n_docs, vocab, max_seqs=3, max_len=30):
    """[[seq, seq, ...] per document]: sentence-split style, some empty sequences included."""
    docs = []
    for _ in range(n_docs):
        docs.append([rng.integers(0, vocab, rng.integers(0, max_len)).astype(np.int64)
                     for _ in range(rng.integers(1, max_seqs + 1))])
    return docs


def build_with_megatron(mcore, prefix: Path, docs, dtype) -> None:
    import torch
    builder = mcore.IndexedDatasetBuilder(str(prefix) + ".bin", dtype=dtype)
    for k, seqs in enumerate(docs):
        if k % 2:  # both builder paths: add_item + end_document, and add_document(tensor, lengths)
            for seq in seqs:
                builder.add_item(torch.from_numpy(seq))
            builder.end_document()
        else:
            builder.add_document(torch.from_numpy(np.concatenate(seqs)), [len(s) for s in seqs])
    builder.finalize(str(prefix) + ".idx")


def write_shards(tmp: Path, samples, *, dtype="uint16") -> Path:
    """samples: list of (docs, continues_previous); docs = [(ids, mask), ...]."""
    with ShardWriter(tmp, "c", dtype=dtype, encode_type="pretrain", max_length=1 << 16,
                     tokens_per_file=150, tokenizer_info=TOK_INFO) as w:
        for docs, cont in samples:
            w.add_sample(docs, continues_previous=cont)
    return tmp / "c"


def chunked_samples(rng, vocab, *, n_docs=25, chunk=16):
    """Pretrain chunking of a document stream: returns (samples, the whole documents)."""
    whole = [rng.integers(0, vocab, rng.integers(1, 40)) for _ in range(n_docs)]
    samples, cur, cur_len, first_continues = [], [], 0, False
    for doc in whole:
        pos = 0
        while pos < len(doc):
            take = min(chunk - cur_len, len(doc) - pos)
            if not cur:  # a new sample: does its first segment start mid-document?
                first_continues = pos > 0
            cur.append((doc[pos:pos + take], np.ones(take, bool)))
            cur_len += take
            pos += take
            if cur_len == chunk:
                samples.append((cur, first_continues))
                cur, cur_len = [], 0
    if cur:
        samples.append((cur, first_continues))
    return samples, whole


# -- read what megatron-core wrote -------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_open_megatron_reads_megatron_core_builder_output(mcore, tmp_path, dtype):
    rng = np.random.default_rng(0)
    vocab = 65000 if dtype == np.uint16 else 200_000
    docs = random_docs(rng, 40, vocab)
    prefix = tmp_path / "corpus_text_document"
    build_with_megatron(mcore, prefix, docs, dtype)
    ref = mcore.IndexedDataset(str(prefix))

    ds = open_megatron(prefix, validate=True)
    seqs = [s for d in docs for s in d]
    assert len(ds) == len(ref) == len(seqs)
    assert ds.dtype == np.dtype(dtype)
    assert np.array_equal(ds.document_indices, ref.document_indices)
    assert np.array_equal(ds.sample_lengths(), ref.sequence_lengths.astype(np.int64))
    assert ds.num_tokens == sum(len(s) for s in seqs)
    assert ds.max_token_id == max(int(s.max()) for s in seqs if len(s))
    starts = set(ref.document_indices[:-1].tolist())
    for i, want in enumerate(seqs):
        s = ds[i]
        assert s.input_ids.dtype == np.dtype(dtype)
        assert s.input_ids.tolist() == want.tolist() == ref[i].tolist()
        assert s.loss_mask.dtype == bool and s.loss_mask.all() and len(s.loss_mask) == len(want)
        assert s.doc_lens.dtype == np.int32 and s.doc_lens.tolist() == [len(want)]
        assert ds.doc_continues(i).tolist() == [i not in starts]
    assert ds[-1].input_ids.tolist() == seqs[-1].tolist()
    with pytest.raises(IndexError, match="out of range"):
        ds[len(seqs)]


# -- write what megatron-core reads ------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["uint16", "int32"])
def test_export_megatron_is_read_by_megatron_core(mcore, tmp_path, dtype):
    rng = np.random.default_rng(1)
    vocab = 65000 if dtype == "uint16" else 150_000
    samples, whole = chunked_samples(rng, vocab)
    # a packed sample of two whole documents at the end
    tail = [rng.integers(0, vocab, 5), rng.integers(0, vocab, 7)]
    samples.append(([(t, np.ones(len(t), bool)) for t in tail], False))
    whole += tail
    ds = open_dataset(write_shards(tmp_path, samples, dtype=dtype))
    assert ds.num_shards > 1

    # split="document": one sequence per whole document, one document per sequence
    res = export_megatron(ds, tmp_path / "mega" / "doc")
    assert not res.loss_mask_dropped
    ref = mcore.IndexedDataset(str(tmp_path / "mega" / "doc"))
    assert ref.index.dtype == np.dtype(dtype).type
    assert len(ref) == len(whole) == res.num_sequences == res.num_documents
    assert ref.sequence_lengths.tolist() == [len(d) for d in whole]
    assert ref.document_indices.tolist() == list(range(len(whole) + 1))
    for i, d in enumerate(whole):
        assert ref[i].tolist() == d.tolist()

    # split="segment": one sequence per segment; documents group the chunks of one document
    export_megatron(ds, tmp_path / "mega" / "seg", split="segment")
    ref = mcore.IndexedDataset(str(tmp_path / "mega" / "seg"))
    segs = [(ids, c and k == 0) for docs, c in samples for k, (ids, _) in enumerate(docs)]
    assert [r.tolist() for r in ref[0:len(ref)]] == [ids.tolist() for ids, _ in segs]
    ends = [k for k, (_, c) in enumerate(segs) if k and not c] + [len(segs)]
    assert ref.document_indices.tolist() == [0] + ends
    assert len(ref.document_indices) - 1 == len(whole)


def test_megatron_round_trip_through_both_tools(mcore, tmp_path):
    """megatron-core builds -> open_megatron -> export_megatron -> megatron-core reads: same."""
    rng = np.random.default_rng(2)
    docs = random_docs(rng, 30, 60000)
    build_with_megatron(mcore, tmp_path / "a", docs, np.uint16)
    export_megatron(open_megatron(tmp_path / "a"), tmp_path / "b", split="segment")
    a, b = mcore.IndexedDataset(str(tmp_path / "a")), mcore.IndexedDataset(str(tmp_path / "b"))
    assert np.array_equal(a.sequence_lengths, b.sequence_lengths)
    assert np.array_equal(a.document_indices, b.document_indices)
    assert np.array_equal(a.index.sequence_pointers, b.index.sequence_pointers)
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    assert (tmp_path / "a.idx").read_bytes() == (tmp_path / "b.idx").read_bytes()


# -- numpy-only behaviour ----------------------------------------------------------------------
def test_export_flags_dropped_loss_masks_and_round_trips(tmp_path):
    samples = [([(np.array([5, 6, 7]), np.array([0, 1, 1])), (np.array([8]), np.array([1]))],
                False),
               ([(np.array([9, 10]), np.ones(2))], True)]
    ds = open_dataset(write_shards(tmp_path, samples))
    with pytest.warns(UserWarning, match="loss mask"):
        res = export_megatron(ds, tmp_path / "m")
    assert res.loss_mask_dropped and "loss masks dropped" in str(res)
    m = open_megatron(tmp_path / "m")
    assert [m[i].input_ids.tolist() for i in range(len(m))] == [[5, 6, 7], [8, 9, 10]]
    assert m.document_indices.tolist() == [0, 1, 2]
    assert not list(tmp_path.glob("m*.tmp*")), "temp files left behind"
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_megatron(ds, tmp_path / "m")
    export_megatron(m, tmp_path / "m", overwrite=True)  # a MegatronDataset exports too


def test_export_dtype_narrowing_refuses_ids_that_do_not_fit(tmp_path, capsys):
    samples = [([(np.array([1, 70000, 3]), np.ones(3))], False)]
    ds = open_dataset(write_shards(tmp_path, samples, dtype="int32"))
    with pytest.raises(ValueError, match="token id 70000 does not fit uint16.*dtype='int32'"):
        export_megatron(ds, tmp_path / "m", dtype="uint16")
    assert not list(tmp_path.glob("m.*")), "a failed export must leave no files"
    # the CLI: bad usage (exit 2), one line naming the sample, the id and the --dtype that fits
    from shardfmt.__main__ import main
    assert main(["export-megatron", str(tmp_path / "c"), str(tmp_path / "m"),
                 "--dtype", "uint16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: sample 0: token id 70000 does not fit uint16") and \
        "--dtype int32" in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not list(tmp_path.glob("m.*")), "a failed export must leave no files"
    ok = open_dataset(write_shards(tmp_path / "ok", [([(np.array([1, 2]), np.ones(2))], False)],
                                   dtype="int32"))
    export_megatron(ok, tmp_path / "n", dtype="uint16")
    assert open_megatron(tmp_path / "n").dtype == np.uint16
    with pytest.raises(ValueError, match="no Megatron token dtype code"):
        export_megatron(ok, tmp_path / "f", dtype="float32")


def test_empty_export(tmp_path):
    class Empty:
        dtype = np.dtype("uint16")

        def __len__(self):
            return 0

    export_megatron(Empty(), tmp_path / "e")
    m = open_megatron(tmp_path / "e", validate=True)
    assert len(m) == 0 and m.num_tokens == 0 and m.max_token_id == -1
    assert m.document_indices.tolist() == [0]


def write_megatron_by_hand(prefix: Path, seqs, *, dtype="uint16", doc_idx=None,
                           pointers=None, magic=MEGATRON_MAGIC, code=8) -> None:
    lens = np.array([len(s) for s in seqs], "<i4")
    size = np.dtype(dtype).itemsize
    ptrs = np.concatenate(([0], np.cumsum(lens.astype(np.int64) * size)[:-1])) if pointers is None \
        else np.asarray(pointers)
    doc_idx = np.arange(len(seqs) + 1) if doc_idx is None else np.asarray(doc_idx)
    Path(str(prefix) + ".bin").write_bytes(b"".join(np.asarray(s, dtype).tobytes() for s in seqs))
    Path(str(prefix) + ".idx").write_bytes(
        MEGATRON_HEADER.pack(magic, 1, code, len(seqs), len(doc_idx)) + lens.tobytes()
        + ptrs.astype("<i8").tobytes() + doc_idx.astype("<i8").tobytes())


def test_hand_written_file_matches_layout(tmp_path):
    write_megatron_by_hand(tmp_path / "h", [[1, 2, 3], [4], []], doc_idx=[0, 2, 3])
    assert (tmp_path / "h.idx").stat().st_size == megatron_index_nbytes(3, 3)
    m = open_megatron(str(tmp_path / "h") + ".idx", validate=True)  # a file name works too
    assert [m[i].input_ids.tolist() for i in range(3)] == [[1, 2, 3], [4], []]
    assert [m.doc_continues(i).tolist() for i in range(3)] == [[False], [True], [False]]
    assert m.num_documents == 2 and m.num_tokens == 4 and m.max_token_id == 4


def test_truncated_idx_names_the_file(tmp_path):
    write_megatron_by_hand(tmp_path / "t", [[1, 2, 3], [4, 5]])
    idx = tmp_path / "t.idx"
    full = idx.read_bytes()
    idx.write_bytes(full[:-5])
    with pytest.raises(CorruptShardError, match=rf"{idx}: {len(full) - 5} bytes.*need {len(full)}"):
        open_megatron(tmp_path / "t")
    idx.write_bytes(full[:20])
    with pytest.raises(CorruptShardError, match=rf"{idx}: 20 bytes, shorter than the 34-byte"):
        open_megatron(tmp_path / "t")
    idx.write_bytes(full + b"\0" * 2)  # one mode byte per sequence: a multimodal index
    with pytest.raises(CorruptShardError, match="multimodal"):
        open_megatron(tmp_path / "t")


def test_bad_magic_version_and_dtype_name_the_file(tmp_path):
    write_megatron_by_hand(tmp_path / "b", [[1, 2]], magic=b"SHRDIDX\x00\x00")
    with pytest.raises(CorruptShardError, match=rf"{tmp_path / 'b.idx'}: bad magic"):
        open_megatron(tmp_path / "b")
    write_megatron_by_hand(tmp_path / "f", [[1, 2]], code=7)
    with pytest.raises(CorruptShardError, match="f.idx: dtype code 7 .float32. holds floats"):
        open_megatron(tmp_path / "f")
    write_megatron_by_hand(tmp_path / "v", [[1, 2]])
    raw = bytearray((tmp_path / "v.idx").read_bytes())
    raw[9:17] = struct.pack("<Q", 2)
    (tmp_path / "v.idx").write_bytes(bytes(raw))
    with pytest.raises(CorruptShardError, match="v.idx: MMIDIDX version 2"):
        open_megatron(tmp_path / "v")
    (tmp_path / "v.bin").unlink()
    with pytest.raises(FileNotFoundError, match="v.bin: missing Megatron file"):
        open_megatron(tmp_path / "v")


def test_pointer_past_eof_names_the_files(tmp_path):
    # the last sequence is checked at open (O(1))
    write_megatron_by_hand(tmp_path / "p", [[1, 2], [3, 4]], pointers=[0, 4000])
    with pytest.raises(CorruptShardError, match=r"p.idx: sequence 1 .pointer 4000 bytes.*p.bin"):
        open_megatron(tmp_path / "p")
    # a middle one is caught by ds[i] and by validate()
    write_megatron_by_hand(tmp_path / "q", [[1, 2], [3, 4], [5]], pointers=[0, 4000, 8])
    m = open_megatron(tmp_path / "q")
    assert m[0].input_ids.tolist() == [1, 2]
    with pytest.raises(CorruptShardError, match=r"q.idx: sequence 1 .*outside.*q.bin \(10 bytes\)"):
        m[1]
    with pytest.raises(CorruptShardError, match="q.idx: sequence 1"):
        m.validate()
    # misaligned pointer, and document indices that do not end at the sequence count
    write_megatron_by_hand(tmp_path / "r", [[1, 2], [3]], pointers=[0, 3])
    with pytest.raises(CorruptShardError, match="misaligned"):
        open_megatron(tmp_path / "r")
    write_megatron_by_hand(tmp_path / "d", [[1, 2], [3]], doc_idx=[0, 2, 1, 2])
    with pytest.raises(CorruptShardError, match=r"d.idx: document index 2 \(1\) is smaller"):
        open_megatron(tmp_path / "d", validate=True)
    write_megatron_by_hand(tmp_path / "s", [[1, 2], [3]], doc_idx=[0, 1])
    with pytest.raises(CorruptShardError, match="s.idx: document indices run from 0 to 1"):
        open_megatron(tmp_path / "s")
    # a .bin cut mid-token
    write_megatron_by_hand(tmp_path / "u", [[1, 2], [3]])
    with open(tmp_path / "u.bin", "ab") as f:
        f.write(b"\0")
    with pytest.raises(CorruptShardError, match="u.bin: 7 bytes is not a whole number"):
        open_megatron(tmp_path / "u")


def _child_reads(ds, conn):
    conn.send(ds[1].input_ids.tolist())
    conn.close()


def test_pickle_and_fork(tmp_path):
    write_megatron_by_hand(tmp_path / "k", [[1, 2], [3, 4, 5]])
    m = open_megatron(tmp_path / "k")
    assert m[0].input_ids.tolist() == [1, 2]
    state = m.__getstate__()
    assert state["_arrays"] is None
    clone = pickle.loads(pickle.dumps(m))
    assert clone._arrays is None and clone[1].input_ids.tolist() == [3, 4, 5]
    if not hasattr(os, "fork"):
        pytest.skip("no fork on this platform")
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_child_reads, args=(m, child))
    p.start()
    assert parent.recv() == [3, 4, 5]
    p.join(10)
    assert p.exitcode == 0
