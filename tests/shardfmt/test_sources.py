"""One dataset protocol for every kind of token data: Megatron prefixes (built by megatron-core's
IndexedDatasetBuilder), directories of them, and shardfmt directories, through `open_dataset`,
`inspect`, `verify` and `export-megatron`; the error hierarchy; MegatronBuilder."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from shardfmt import (ConcatDataset, CorruptShardError, DatasetNotFoundError,
                      IncompleteDatasetError, MegatronBuilder, MixSpecError, ShardfmtError,
                      ShardWriter, TokenDataset, open_dataset)
from shardfmt.sources import path_problem
from shardfmt.spec import HEADER, MAGIC, pack_header, unpack_header, IndexHeader

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def mcore():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Transformer Engine and Apex are not installed"
        return pytest.importorskip("megatron.core.datasets.indexed_dataset",
                                   reason="megatron-core not installed (in the dev extra)")


def build_mcore(mcore, prefix: Path, docs: list[list[list[int]]], dtype=np.uint16) -> None:
    """docs = [[seq, seq...] per document], written by megatron-core's own builder."""
    import torch
    builder = mcore.IndexedDatasetBuilder(str(prefix) + ".bin", dtype=dtype)
    for seqs in docs:
        builder.add_document(torch.tensor([t for s in seqs for t in s], dtype=torch.int64),
                             [len(s) for s in seqs])
    builder.finalize(str(prefix) + ".idx")


@pytest.fixture(scope="module")
def corpora(mcore, tmp_path_factory):
    """A Megatron prefix, a directory of two prefixes (as datatrove writes), a shardfmt dir."""
    root = tmp_path_factory.mktemp("sources")
    rng = np.random.default_rng(0)

    def docs(n):
        return [[rng.integers(0, 60000, rng.integers(1, 20)).tolist()
                 for _ in range(rng.integers(1, 3))] for _ in range(n)]

    one = docs(6)
    build_mcore(mcore, root / "single_text_document", one)
    (root / "shards").mkdir()
    parts = [docs(4), docs(5)]
    build_mcore(mcore, root / "shards" / "00001_text", parts[1])  # name order, not build order
    build_mcore(mcore, root / "shards" / "00000_text", parts[0])
    (root / "shards" / "README.txt").write_text("not data")
    with ShardWriter(root, "ours", dtype="uint16", encode_type="qa", max_length=64,
                     tokenizer_info={"len": 65000}) as w:
        w.add_sample([([1, 2, 3], [0, 1, 1])])
        w.add_sample([([4, 5], [1, 1])])
    seqs = lambda ds: [s for d in ds for s in d]  # noqa: E731
    return {"root": root, "prefix": root / "single_text_document", "dir": root / "shards",
            "ours": root / "ours", "single_seqs": seqs(one),
            "dir_seqs": seqs(parts[0]) + seqs(parts[1])}


def _ids(ds) -> list[list[int]]:
    return [ds[i].input_ids.tolist() for i in range(len(ds))]


def test_every_kind_opens_through_one_protocol(corpora, mcore):
    prefix = open_dataset(corpora["prefix"])
    assert isinstance(prefix, TokenDataset) and prefix.kind == "megatron"
    assert _ids(prefix) == corpora["single_seqs"]
    assert _ids(open_dataset(str(corpora["prefix"]) + ".idx")) == corpora["single_seqs"]
    directory = open_dataset(corpora["dir"])
    assert isinstance(directory, ConcatDataset) and isinstance(directory, TokenDataset)
    assert [Path(p).name for p in directory.paths] == ["00000_text", "00001_text"]
    assert _ids(directory) == corpora["dir_seqs"]
    assert directory.doc_continues(0).tolist() == [False]
    mixed = open_dataset([corpora["ours"], corpora["prefix"], corpora["dir"]])
    assert len(mixed) == 2 + len(corpora["single_seqs"]) + len(corpora["dir_seqs"])
    assert _ids(mixed) == [[1, 2, 3], [4, 5]] + corpora["single_seqs"] + corpora["dir_seqs"]
    assert mixed[0].loss_mask.tolist() == [False, True, True] and mixed[2].loss_mask.all()
    assert mixed.manifests == open_dataset(corpora["ours"]).manifests  # Megatron has none
    assert mixed.max_token_id == max(max(s) for s in corpora["single_seqs"] + corpora["dir_seqs"])
    assert (mixed.sample_lengths() == [len(x) for x in _ids(mixed)]).all()
    ref = mcore.IndexedDataset(str(corpora["prefix"]))  # same bytes read by megatron-core
    assert [ref[i].tolist() for i in range(len(ref))] == _ids(prefix)


def test_path_problems_name_the_path_and_the_fix(corpora, tmp_path):
    assert path_problem(corpora["prefix"]) is None and path_problem(corpora["dir"]) is None
    assert "no such dataset" in path_problem(tmp_path / "nope")
    assert "Megatron prefix" in path_problem(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "no manifest.json" in path_problem(tmp_path / "empty")
    with pytest.raises(DatasetNotFoundError, match="nope: no such dataset"):
        open_dataset(tmp_path / "nope")
    with pytest.raises(IncompleteDatasetError, match="incomplete dataset"):
        open_dataset(tmp_path / "empty")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardfmt", *args], capture_output=True,
                          text=True, cwd=REPO)


def test_inspect_verify_and_export_accept_megatron(corpora, tmp_path, mcore):
    out = _cli("inspect", str(corpora["dir"]), "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["kind"] == "concat" and summary["samples"] == len(corpora["dir_seqs"])
    assert [p["kind"] for p in summary["parts"]] == ["megatron", "megatron"]
    out = _cli("inspect", str(corpora["prefix"]), "--show", "1")
    assert out.returncode == 0 and "Megatron-LM MMIDIDX" in out.stdout and "--- sample 0" in out.stdout
    ok = _cli("verify", str(corpora["prefix"]), str(corpora["dir"]), str(corpora["ours"]))
    assert ok.returncode == 0 and ok.stdout.startswith("OK"), ok.stdout + ok.stderr
    assert "Megatron: header, file sizes and every index entry verified" in ok.stdout
    assert "shardfmt: checksums" in ok.stdout
    # export: a directory of Megatron pairs becomes one pair that megatron-core reads
    exp = _cli("export-megatron", str(corpora["dir"]), str(tmp_path / "joined"), "--split",
               "segment")
    assert exp.returncode == 0, exp.stderr
    ref = mcore.IndexedDataset(str(tmp_path / "joined"))
    assert [ref[i].tolist() for i in range(len(ref))] == corpora["dir_seqs"]
    assert len(ref.document_indices) - 1 == 9  # 4 + 5 documents kept


def test_verify_catches_damaged_megatron_files(corpora, tmp_path):
    import shutil
    for ext in (".bin", ".idx"):
        shutil.copy(str(corpora["prefix"]) + ext, str(tmp_path / "m") + ext)
    idx = tmp_path / "m.idx"
    raw = bytearray(idx.read_bytes())
    # first sequence pointer (after the 34-byte header and S int32 lengths) far past .bin
    s = int.from_bytes(raw[18:26], "little")
    raw[34 + 4 * s:34 + 4 * s + 8] = (10**9).to_bytes(8, "little")
    idx.write_bytes(bytes(raw))
    bad = _cli("verify", str(tmp_path / "m"))
    assert bad.returncode == 1 and f"FAIL {idx}: sequence 0" in bad.stdout, bad.stdout
    idx.write_bytes(bytes(raw[:-3]))  # size no longer matches the header
    bad = _cli("verify", str(tmp_path / "m"))
    assert bad.returncode == 1 and "m.idx" in bad.stdout and "need" in bad.stdout
    (tmp_path / "m.bin").unlink()
    bad = _cli("verify", str(tmp_path / "m"))
    assert bad.returncode == 1 and "m.bin: missing Megatron file" in bad.stdout


def test_megatron_builder_writes_what_megatron_core_writes(mcore, tmp_path):
    docs = [[[5, 6, 7], [8]], [[9]], [[10, 11], [], [12]]]
    build_mcore(mcore, tmp_path / "ref", docs, dtype=np.int32)
    with MegatronBuilder(tmp_path / "ours", dtype="int32") as b:
        for seqs in docs:
            b.add_document([t for s in seqs for t in s], lengths=[len(s) for s in seqs])
        result = b.finalize()
    assert result.num_sequences == 6 and result.num_documents == 3 and result.num_tokens == 8
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes()
    with pytest.raises(RuntimeError):  # an error inside the block leaves nothing behind
        with MegatronBuilder(tmp_path / "half", dtype="uint16") as b:
            b.add_document([1, 2, 3])
            raise RuntimeError("interrupted")
    assert not list(tmp_path.glob("half*"))
    with MegatronBuilder(tmp_path / "nofinal", dtype="uint16") as b:
        b.add_document([1])  # no finalize(): nothing that looks complete
    assert not list(tmp_path.glob("nofinal*"))
    with pytest.raises(ValueError, match="token id 70000 does not fit uint16"):
        with MegatronBuilder(tmp_path / "narrow", dtype="uint16") as b:
            b.add_document(np.array([1, 70000]))


def test_one_error_family():
    for cls in (CorruptShardError, IncompleteDatasetError, DatasetNotFoundError, MixSpecError):
        assert issubclass(cls, ShardfmtError)
    raw = bytearray(pack_header(IndexHeader(1, "uint16", 0, 0, 0, 0)))
    for offset, value, message in [(0, b"XXXXXXXX", "bad magic"), (8, b"\x09", "format version 9"),
                                   (12, b"\x07", "unknown token dtype code 7")]:
        broken = bytearray(raw)
        broken[offset:offset + len(value)] = value
        with pytest.raises(CorruptShardError, match=f"x.idx: {message}"):
            unpack_header(bytes(broken), path="x.idx")
    with pytest.raises(CorruptShardError, match="It is a Megatron MMIDIDX index"):
        unpack_header(b"MMIDIDX\x00\x00" + bytes(HEADER.size), path="x.idx")
    assert unpack_header(bytes(raw), path="x.idx").dtype == "uint16" and raw.startswith(MAGIC)


def _imports(module: str) -> set[str]:
    """Modules imported at run time (anywhere, lazily too; `if TYPE_CHECKING:` blocks excepted)."""
    tree = ast.parse((REPO / "shardfmt" / f"{module}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_no_import_circle_between_reader_and_megatron():
    """reader and megatron both build on protocol/spec/errors; neither imports the other (not
    even lazily), and only sources.py knows both."""
    assert "shardfmt.megatron" not in _imports("reader")
    assert "shardfmt.reader" not in _imports("megatron")
    assert "shardfmt.reader" not in _imports("verify")
    assert {"shardfmt.reader", "shardfmt.megatron"} <= _imports("sources")
