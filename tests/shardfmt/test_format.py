"""Writer -> reader round trips, dtype bounds, crash safety and corruption detection."""

from __future__ import annotations

import json
import multiprocessing as mp
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardfmt import (CorruptShardError, IncompleteDatasetError, ShardWriter, dtype_max_id,
                      open_dataset, smallest_dtype_for)
from shardfmt.merge import merge_datasets
from shardfmt.spec import HEADER
from shardfmt.verify import verify_dataset

REPO = Path(__file__).resolve().parents[2]
TOK_INFO = {"len": 1000, "vocab_hash": "test"}


def write(tmp: Path, samples, *, name="c", dtype="uint16", tokens_per_file=1 << 30,
          max_length=4096, **kw) -> Path:
    with ShardWriter(tmp, name, dtype=dtype, encode_type="qa", max_length=max_length,
                     tokens_per_file=tokens_per_file, tokenizer_info=TOK_INFO, **kw) as w:
        for docs in samples:
            w.add_sample(docs)
    return tmp / name


# -- round trips -----------------------------------------------------------------------------
doc_strategy = st.integers(1, 40).flatmap(lambda n: st.tuples(
    st.lists(st.integers(0, 65535), min_size=n, max_size=n),
    st.lists(st.booleans(), min_size=n, max_size=n)))
sample_strategy = st.lists(doc_strategy, min_size=1, max_size=4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(samples=st.lists(sample_strategy, min_size=1, max_size=25),
       tokens_per_file=st.integers(1, 200))
def test_round_trip_any_packing_and_sharding(tmp_path_factory, samples, tokens_per_file):
    out = write(tmp_path_factory.mktemp("rt"), samples, tokens_per_file=tokens_per_file)
    ds = open_dataset(out)
    assert len(ds) == len(samples)
    for i, docs in enumerate(samples):
        s = ds[i]
        assert s.input_ids.tolist() == [t for ids, _ in docs for t in ids]
        assert s.loss_mask.tolist() == [bool(m) for _, mask in docs for m in mask]
        assert s.doc_lens.tolist() == [len(ids) for ids, _ in docs]
    assert ds.sample_lengths().tolist() == [sum(len(i) for i, _ in d) for d in samples]
    assert verify_dataset(ds) == []
    # every shard obeys the roll rule: it exceeds tokens_per_file only when it holds one sample
    for sh in ds.shards():
        assert sh.header.num_tokens <= tokens_per_file or sh.header.num_samples == 1


def test_negative_index_and_out_of_range(tmp_path):
    ds = open_dataset(write(tmp_path, [[([1, 2], [1, 1])], [([3], [0])]]))
    assert ds[-1].input_ids.tolist() == [3]
    with pytest.raises(IndexError, match="out of range"):
        ds[2]


def test_continuation_flag_and_token_zero(tmp_path):
    with ShardWriter(tmp_path, "p", dtype="int32", encode_type="pretrain", max_length=4,
                     tokenizer_info=TOK_INFO, packing="chunk") as w:
        w.add_sample([([0, 0, 5, 2], [1, 1, 1, 1])])
        w.add_sample([([7, 2], [1, 1]), ([0, 9], [1, 1])], continues_previous=True)
    ds = open_dataset(tmp_path / "p")
    assert ds[0].input_ids.tolist() == [0, 0, 5, 2]  # id 0 is a real token
    assert ds.doc_continues(0).tolist() == [False]
    assert ds.doc_continues(1).tolist() == [True, False]


def test_mask_none_means_every_token_trained(tmp_path):
    with ShardWriter(tmp_path, "p", dtype="uint16", encode_type="pretrain", max_length=8,
                     tokenizer_info=TOK_INFO) as w:
        w.add_sample([([4, 5, 6], None), ([7, 8], [0, 1])])
    s = open_dataset(tmp_path / "p")[0]
    assert s.loss_mask.tolist() == [True, True, True, False, True]
    assert s.doc_lens.tolist() == [3, 2]


def test_several_directories_concatenate(tmp_path):
    a = write(tmp_path / "a", [[([1], [1])]])
    b = write(tmp_path / "b", [[([2], [1])], [([3], [1])]], dtype="int32")
    ds = open_dataset([a, b])
    assert [ds[i].input_ids.tolist() for i in range(3)] == [[1], [2], [3]]
    assert ds.dtype == np.dtype("int32")


# -- dtype bounds ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["uint16", "int16", "int32"])
def test_dtype_bounds(tmp_path, dtype):
    top = dtype_max_id(dtype)
    out = write(tmp_path, [[([0, top], [1, 1])]], dtype=dtype)
    assert open_dataset(out)[0].input_ids.tolist() == [0, top]
    with ShardWriter(tmp_path, "over", dtype=dtype, encode_type="qa", max_length=8,
                     tokenizer_info=TOK_INFO) as w:
        with pytest.raises(ValueError, match=f"token id {top + 1} does not fit dtype {dtype}"):
            w.add_sample([([top + 1], [1])])
        with pytest.raises(ValueError, match="negative"):
            w.add_sample([([-1], [1])])


def test_int16_error_names_the_dtype_that_fits(tmp_path):
    with ShardWriter(tmp_path, "c", dtype="int16", encode_type="qa", max_length=8,
                     tokenizer_info=TOK_INFO) as w:
        with pytest.raises(ValueError, match="use --save_dtype uint16"):
            w.add_sample([([40000], [1])])
        with pytest.raises(ValueError, match="use --save_dtype int32"):
            w.add_sample([([151668], [1])])


def test_smallest_dtype_for():
    assert smallest_dtype_for(50257) == "uint16"
    assert smallest_dtype_for(65536) == "uint16"
    assert smallest_dtype_for(65537) == "int32"
    assert smallest_dtype_for(151669) == "int32"


@pytest.mark.parametrize("docs, message", [
    ([], "at least one document"),
    ([([], [])], "non-empty"),
    ([([1, 2], [1])], "loss_mask has 1 entries for 2 ids"),
    ([([1.5], [1])], "integers"),
    ([([1] * 9, [1] * 9)], "longer than max_length=8"),
])
def test_bad_samples_rejected(tmp_path, docs, message):
    with ShardWriter(tmp_path, "c", dtype="uint16", encode_type="qa", max_length=8,
                     tokenizer_info=TOK_INFO) as w:
        with pytest.raises(ValueError, match=message):
            w.add_sample(docs)


# -- crash safety and overwrite ---------------------------------------------------------------
def test_exception_inside_writer_leaves_no_manifest(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, "c", dtype="uint16", encode_type="qa", max_length=8,
                         tokens_per_file=2, tokenizer_info=TOK_INFO) as w:
            for _ in range(5):
                w.add_sample([([1, 2], [1, 1])])
            raise RuntimeError("plugin failed")
    assert not (tmp_path / "c" / "manifest.json").exists()
    assert not list((tmp_path / "c").glob("*.tmp"))
    with pytest.raises(IncompleteDatasetError, match="incomplete dataset.*--overwrite"):
        open_dataset(tmp_path / "c")


def test_refuses_existing_corpus_unless_overwrite(tmp_path):
    write(tmp_path, [[([1], [1])]])
    with pytest.raises(FileExistsError, match="--overwrite"):
        write(tmp_path, [[([2], [1])]])
    out = write(tmp_path, [[([2], [1])]], overwrite=True)
    assert open_dataset(out)[0].input_ids.tolist() == [2]


def test_failed_overwrite_keeps_the_old_dataset(tmp_path):
    """The new dataset is written beside the old one and swapped in at close(): a failure (or a
    kill) before that leaves the old dataset complete and readable."""
    old = write(tmp_path, [[([1, 2, 3], [0, 1, 1])]] * 3, tokens_per_file=3)
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, "c", dtype="uint16", encode_type="qa", max_length=8,
                         tokens_per_file=3, tokenizer_info=TOK_INFO, overwrite=True) as w:
            w.add_sample([([7, 7], [1, 1])])
            w.add_sample([([8, 8], [1, 1])])          # the first new shard is finished
            assert w.directory == tmp_path / ".c.incoming"
            assert {p.name: p.read_bytes() for p in old.iterdir()} == before
            raise RuntimeError("plugin failed")
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before
    assert open_dataset(old)[2].input_ids.tolist() == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]      # staging removed
    (tmp_path / ".c.incoming").mkdir()                 # as a SIGKILL would leave it
    (tmp_path / ".c.incoming" / "c_00000.bin.tmp").write_bytes(b"x")
    out = write(tmp_path, [[([9], [1])]], overwrite=True)
    assert out == tmp_path / "c" and open_dataset(out)[0].input_ids.tolist() == [9]
    assert len(open_dataset(out)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]      # no .incoming / .replaced


def test_overwrite_refuses_foreign_directory(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="does not look like a shardfmt dataset"):
        write(tmp_path, [[([2], [1])]], overwrite=True)
    assert (tmp_path / "c" / "notes.txt").exists()


def _killed_writer(out: str) -> None:
    import os
    w = ShardWriter(out, "c", dtype="uint16", encode_type="qa", max_length=8, tokens_per_file=4,
                    tokenizer_info=TOK_INFO)
    for _ in range(10):
        w.add_sample([([1, 2, 3], [0, 1, 1])])
    os._exit(9)  # dies without closing: some shards renamed, one in progress, no manifest


def test_killed_writer_is_refused(tmp_path):
    p = mp.get_context("spawn").Process(target=_killed_writer, args=(str(tmp_path),))
    p.start()
    p.join()
    assert p.exitcode == 9
    assert list((tmp_path / "c").glob("c_00000.bin"))  # finished shards exist ...
    with pytest.raises(IncompleteDatasetError):  # ... but the dataset is refused
        open_dataset(tmp_path / "c")


# -- corruption ------------------------------------------------------------------------------
@pytest.fixture
def dataset(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    samples = [[(rng.integers(0, 60000, n).tolist(), (rng.random(n) < 0.5).tolist())
                for n in rng.integers(1, 30, rng.integers(1, 4))] for _ in range(200)]
    return write(tmp_path, samples, tokens_per_file=1500)


def _truncate(path: Path, n: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:max(len(data) - n, 0)])


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncate_bin", "truncate_idx", "truncate_idx_to_header",
                                    "magic", "version", "dtype_code", "counts", "offsets",
                                    "tokens", "spans", "delete_manifest", "delete_bin",
                                    "swap_shards", "manifest_garbage"])
def test_every_corruption_is_reported_with_the_file(dataset, damage):
    bin0, idx0 = dataset / "c_00000.bin", dataset / "c_00000.idx"
    bin1, idx1 = dataset / "c_00001.bin", dataset / "c_00001.idx"
    named = {"truncate_bin": bin0, "truncate_idx": idx0, "truncate_idx_to_header": idx0,
             "magic": idx0, "version": idx0, "dtype_code": idx0, "counts": idx0,
             "offsets": idx0, "tokens": bin0, "spans": idx0, "delete_bin": bin0,
             "swap_shards": dataset / "c_00000.", "delete_manifest": dataset, "manifest_garbage": dataset}
    if damage == "truncate_bin":
        _truncate(bin0, 2)
    elif damage == "truncate_idx":
        _truncate(idx0, 1)
    elif damage == "truncate_idx_to_header":
        idx0.write_bytes(idx0.read_bytes()[:20])
    elif damage == "magic":
        _flip(idx0, 0)
    elif damage == "version":
        _flip(idx0, 8)
    elif damage == "dtype_code":
        _flip(idx0, 12)
    elif damage == "counts":
        _flip(idx0, 16)
    elif damage == "offsets":
        _flip(idx0, HEADER.size + 8 * 3 + 1)
    elif damage == "tokens":
        _flip(bin0, 101)
    elif damage == "spans":
        _flip(idx0, -12)
    elif damage == "delete_manifest":
        (dataset / "manifest.json").unlink()
    elif damage == "delete_bin":
        bin0.unlink()
    elif damage == "swap_shards":
        b0, i0 = bin0.read_bytes(), idx0.read_bytes()
        bin0.write_bytes(bin1.read_bytes()), idx0.write_bytes(idx1.read_bytes())
        bin1.write_bytes(b0), idx1.write_bytes(i0)
    elif damage == "manifest_garbage":
        (dataset / "manifest.json").write_text("{not json")
    try:
        ds = open_dataset(dataset)
    except (CorruptShardError, IncompleteDatasetError, ValueError) as err:
        assert str(named[damage]) in str(err)
        return
    # Opening is cheap (sizes + headers); byte flips inside arrays are caught by verify.
    problems = verify_dataset(ds)
    assert problems, f"{damage} went unnoticed"
    assert any(str(named[damage]) in p for p in problems)


def test_verify_cli_exit_codes(dataset):
    ok = subprocess.run([sys.executable, "-m", "shardfmt", "verify", str(dataset)],
                        capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0 and ok.stdout.startswith("OK"), ok.stdout + ok.stderr
    _flip(dataset / "c_00001.bin", 7)
    bad = subprocess.run([sys.executable, "-m", "shardfmt", "verify", str(dataset)],
                         capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 1 and "c_00001.bin: checksum" in bad.stdout


def test_verify_cli_runs_the_preference_and_doc_flag_checks(tmp_path, capsys):
    """`python -m shardfmt verify` runs verify_dataset: checksums pass, yet a preference sample
    that is not whole (chosen, rejected) pairs, or a KTO flag in a qa dataset, fails (exit 1),
    also inside a concatenation of several datasets."""
    from shardfmt.__main__ import main
    from shardfmt.spec import DOC_FLAG_UNDESIRABLE
    from shardfmt.preference import preference_manifest_entry
    with ShardWriter(tmp_path, "pref", dtype="uint16", encode_type="preference", max_length=64,
                     tokenizer_info=TOK_INFO, manifest_extra={"preference": preference_manifest_entry(
                         sequence_max_length=64, pairs=1)}) as w:
        w.add_sample([([1, 2], [0, 1]), ([1, 3], [0, 1]), ([1, 4], [0, 1])])  # 1.5 pairs
    flagged = ShardWriter(tmp_path, "flags", dtype="uint16", encode_type="qa", max_length=64,
                          tokenizer_info=TOK_INFO)
    with flagged as w:
        w.add_sample([([1, 2], [0, 1])], doc_flags=[DOC_FLAG_UNDESIRABLE])
    good = write(tmp_path, [[([1, 2], [0, 1])]], name="good")
    assert main(["verify", str(good)]) == 0 and capsys.readouterr().out.startswith("OK 1 samples")
    for dirs, want in [([tmp_path / "pref"], "not whole (chosen, rejected) pairs"),
                       ([good, tmp_path / "flags"], "has doc_flags 2; allowed bits here")]:
        assert main(["verify", *map(str, dirs)]) == 1
        out = capsys.readouterr().out
        assert out.startswith("FAIL ") and want in out and "OK" not in out, out


def test_offset_outside_file_raises_not_reads(dataset):
    """An index whose offsets point past the tokens raises on access instead of reading junk."""
    idx = dataset / "c_00000.idx"
    data = bytearray(idx.read_bytes())
    data[HEADER.size + 8:HEADER.size + 16] = np.int64(10**12).tobytes()  # sample 0 end
    idx.write_bytes(bytes(data))
    ds = open_dataset(dataset)
    with pytest.raises(CorruptShardError, match="c_00000.idx: sample 0"):
        ds[0]


# -- processes, merge, CLI -------------------------------------------------------------------
def _sum_tokens(args):
    ds, idxs = args
    return [int(ds[i].input_ids.astype(np.int64).sum()) for i in idxs]


def test_pickles_without_mappings_and_works_in_workers(dataset):
    ds = open_dataset(dataset)
    ds[0]  # map in the parent first
    blob = pickle.dumps(ds)
    assert len(blob) < 200_000  # no token data inside
    want = [int(ds[i].input_ids.astype(np.int64).sum()) for i in range(len(ds))]
    for method in ("fork", "spawn"):
        with mp.get_context(method).Pool(2) as pool:
            got = pool.map(_sum_tokens, [(ds, range(0, 100)), (ds, range(100, 200))])
        assert got[0] + got[1] == want


def test_merge_reads_like_one_dataset(tmp_path):
    parts = [write(tmp_path / f"part{k}", [[([k, i], [0, 1])] for i in range(5)],
                   tokens_per_file=4) for k in range(3)]
    merged = merge_datasets(parts, tmp_path / "all" / "c")
    ds = open_dataset(merged)
    assert [ds[i].input_ids.tolist() for i in range(len(ds))] == \
        [[k, i] for k in range(3) for i in range(5)]
    assert verify_dataset(ds) == []
    manifest = json.loads((merged / "manifest.json").read_text())
    assert manifest["totals"]["samples"] == 15


def test_merge_refuses_other_tokenizer(tmp_path):
    a = write(tmp_path / "a", [[([1], [1])]])
    with ShardWriter(tmp_path / "b", "c", dtype="uint16", encode_type="qa", max_length=4096,
                     tokenizer_info={"vocab_hash": "other"}) as w:
        w.add_sample([([1], [1])])
    with pytest.raises(ValueError, match="different tokenizer"):
        merge_datasets([a, tmp_path / "b" / "c"], tmp_path / "m")


def test_inspect_cli(dataset):
    out = subprocess.run([sys.executable, "-m", "shardfmt", "inspect", str(dataset), "--json",
                          "--show", "1"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.split("\n--- sample")[0])
    assert summary["samples"] == 200 and summary["shards"] > 1
    assert 0 < summary["loss_fraction"] < 1
    assert "--- sample 0" in out.stdout and "[[" in out.stdout


def test_inspect_incomplete_dataset_exits_nonzero(tmp_path):
    (tmp_path / "c").mkdir()
    out = subprocess.run([sys.executable, "-m", "shardfmt", "inspect", str(tmp_path / "c")],
                         capture_output=True, text=True, cwd=REPO)
    # bad input (the path is not a finished dataset): 2, the one exit-code convention (README)
    assert out.returncode == 2 and "incomplete dataset" in out.stderr


def test_open_dataset_reads_megatron_prefix_and_mixes(tmp_path):
    from shardfmt import export_megatron
    ours = write(tmp_path / "ours", [[([5, 6], [0, 1])], [([7], [1])]])
    export_megatron(open_dataset(ours), tmp_path / "mega" / "text_document")
    mixed = open_dataset([ours, tmp_path / "mega" / "text_document"])
    assert len(mixed) == 4
    assert [mixed[i].input_ids.tolist() for i in range(4)] == [[5, 6], [7], [5, 6], [7]]
    assert mixed[2].loss_mask.tolist() == [True, True]  # Megatron: every token trained
    assert mixed.sample_lengths().tolist() == [2, 1, 2, 1]


def test_export_megatron_cli(tmp_path, dataset):
    prefix = tmp_path / "m" / "doc"
    cmd = [sys.executable, "-m", "shardfmt", "export-megatron", str(dataset), str(prefix)]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert first.returncode == 0, first.stderr
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert again.returncode == 2 and "overwrite" in again.stderr   # bad usage: exit 2 (README)
    assert subprocess.run(cmd + ["--overwrite"], cwd=REPO, capture_output=True).returncode == 0
    assert open_dataset(prefix).num_tokens == open_dataset(dataset).num_tokens


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.booleans(), min_size=1, max_size=12), min_size=1, max_size=6))
def test_sample_loss_spans_equal_per_document_spans(masks):
    """The one-pass span computation splits runs at document boundaries exactly like one
    computation per document (the bytes of .idx files do not depend on it)."""
    from shardfmt.writer import sample_loss_spans
    expected, offset = [], 0
    for m in masks:
        edges = np.flatnonzero(np.diff(np.concatenate(([0], np.array(m, np.int8), [0]))))
        expected += (edges + offset).tolist()
        offset += len(m)
    full = np.concatenate([np.array(m, bool) for m in masks])
    assert sample_loss_spans(full, [len(m) for m in masks]).tolist() == expected


def _random_block(rng, *, max_length: int, n: int):
    from shardfmt.writer import SampleBlock
    per_sample = rng.integers(1, 4, size=n)
    doc_lens = np.concatenate([rng.multinomial(int(rng.integers(k, max_length + 1)) - k,
                                               np.ones(k) / k) + 1 for k in per_sample])
    ids = rng.integers(0, 1000, size=int(doc_lens.sum()))
    return SampleBlock(ids, doc_lens, per_sample, rng.random(n) < 0.5)


@pytest.mark.parametrize("tokens_per_file", [1 << 30, 50, 7])
def test_add_block_writes_the_bytes_of_add_sample(tmp_path, tokens_per_file):
    """ShardWriter.add_block (pretrain's bulk path) == add_sample per sample, byte for byte,
    including shard boundaries (tokens_per_file 7 < some samples: one sample per shard)."""
    rng = np.random.default_rng(tokens_per_file)
    blocks = [_random_block(rng, max_length=12, n=int(rng.integers(1, 20))) for _ in range(6)]
    kw = dict(dtype="uint16", encode_type="pretrain", max_length=12,
              tokens_per_file=tokens_per_file, tokenizer_info=TOK_INFO, packing="chunk")
    with ShardWriter(tmp_path / "one", "c", **kw) as w:
        for b in blocks:
            segs = np.split(b.ids, np.cumsum(b.doc_lens)[:-1])
            k = 0
            for n, cont in zip(b.docs_per_sample, b.continues):
                w.add_sample([(s, None) for s in segs[k:k + n]], continues_previous=bool(cont))
                k += n
        one_shards = w.shard_tokens
    with ShardWriter(tmp_path / "bulk", "c", **kw) as w:
        for b in blocks:
            w.add_block(b)
        assert w.shard_tokens == one_shards
    one, bulk = tmp_path / "one" / "c", tmp_path / "bulk" / "c"
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in bulk.iterdir()) and len(names) > 1
    for name in names:
        if name == "manifest.json":
            a, b = (json.loads((d / name).read_text()) for d in (one, bulk))
            a.pop("created_unix"), b.pop("created_unix")
            assert a == b
        else:
            assert (one / name).read_bytes() == (bulk / name).read_bytes(), name


def test_add_block_rejects_bad_blocks(tmp_path):
    from shardfmt.writer import SampleBlock
    with ShardWriter(tmp_path, "c", dtype="uint16", encode_type="pretrain", max_length=4,
                     tokenizer_info=TOK_INFO) as w:
        with pytest.raises(ValueError, match="longer than max_length=4"):
            w.add_block(SampleBlock(np.arange(5), np.array([5]), np.array([1]), np.array([False])))
        with pytest.raises(ValueError, match="inconsistent block"):
            w.add_block(SampleBlock(np.arange(4), np.array([3]), np.array([1]), np.array([False])))
        with pytest.raises(ValueError, match="does not fit dtype uint16"):
            w.add_block(SampleBlock(np.array([1, 70000]), np.array([2]), np.array([1]),
                                    np.array([False])))
        with pytest.raises(ValueError, match="at least one id"):
            w.add_block(SampleBlock(np.arange(2), np.array([2, 0]), np.array([2]),
                                    np.array([False])))
        w.add_block(SampleBlock(np.arange(4), np.array([4]), np.array([1]), np.array([False])))
    assert open_dataset(tmp_path / "c").sample_lengths().tolist() == [4]
