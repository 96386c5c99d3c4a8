"""Every file that marks or completes an output reaches the disk before the rename that publishes
it (docs/ARCHITECTURE.md "Durable writes"): shardfmt's open_atomic / write_text_atomic (a temp
file of a unique name, fsync, rename, directory fsync; the temp removed on failure) and fsync_tree
(every file and directory below a tree that is about to be renamed into place).

fsync calls are recorded by wrapping os.fsync as the writer module sees it; no test needs a
crash: what is checked is the order (fsync before rename) and what is left behind on failure.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

import shardfmt.writer as writer
from shardfmt.writer import fsync_tree, open_atomic, write_text_atomic


@pytest.fixture
def fsynced(monkeypatch) -> list[str]:
    """Paths fsynced through shardfmt.writer (files and directories), in order."""
    synced: list[str] = []
    real = os.fsync

    def record(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)
    monkeypatch.setattr(writer.os, "fsync", record)
    return synced


def disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device (injected)")


def test_fsync_tree_syncs_every_file_and_directory_children_first(tmp_path, fsynced):
    (tmp_path / "t" / "deepspeed" / "ds").mkdir(parents=True)
    files = [tmp_path / "t" / "model.safetensors", tmp_path / "t" / "deepspeed" / "ds" / "a.pt",
             tmp_path / "t" / "deepspeed" / "ds" / "b.pt"]
    for f in files:
        f.write_bytes(b"x")
    (tmp_path / "t" / "link").symlink_to(files[0])  # not followed, not counted
    assert fsync_tree(tmp_path / "t") == len(files) + 3
    dirs = [str(tmp_path / "t" / "deepspeed" / "ds"), str(tmp_path / "t" / "deepspeed"),
            str(tmp_path / "t")]
    assert set(fsynced) == set(map(str, files)) | set(dirs) and len(fsynced) == 6
    assert [p for p in fsynced if p in dirs] == dirs  # a directory after everything inside it
    with pytest.raises(FileNotFoundError):  # a tree that vanished is an error, not a no-op
        fsync_tree(tmp_path / "gone")


def test_two_writers_of_one_path_never_share_a_temp_file(tmp_path):
    """Interleaved writers (Slurm array tasks writing the same job file): each has its own temp,
    both complete, the file holds one whole version; nothing is left behind."""
    path = tmp_path / "job.json"
    with open_atomic(path, "w") as a, open_atomic(path, "w") as b:
        a.write("A" * 1000)
        b.write("B" * 1000)
        temps = sorted(p.name for p in tmp_path.iterdir())
        assert len(temps) == 2 and all(n.startswith(f"job.json.{os.getpid()}.") and
                                       n.endswith(".tmp") for n in temps), temps
    assert path.read_text() in ("A" * 1000, "B" * 1000)
    assert [p.name for p in tmp_path.iterdir()] == ["job.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path, fsynced, monkeypatch):
    path = tmp_path / "latest"
    write_text_atomic(path, "step_1\n")
    assert fsynced[-1] == str(tmp_path) and fsynced[-2].startswith(str(path) + ".")
    monkeypatch.setattr(writer.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_text_atomic(path, "step_2\n")
    with pytest.raises(KeyError):  # any exception inside the block: the same
        with open_atomic(path, "w") as f:
            f.write("half")
            raise KeyError("boom")
    assert path.read_text() == "step_1\n" and [p.name for p in tmp_path.iterdir()] == ["latest"]


def test_atomic_files_get_the_umask_mode_like_open(tmp_path):
    """Not tempfile.mkstemp's 0o600: a dataset's manifest stays readable by the group."""
    (tmp_path / "plain").write_text("x")
    write_text_atomic(tmp_path / "atomic", "x")
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "atomic") == mode(tmp_path / "plain")


def test_reference_file_is_durable_and_leaves_no_temp(tmp_path, fsynced, monkeypatch):
    from trainer.preference import save_reference_file
    path = tmp_path / "ref_logps.npz"
    save_reference_file(path, np.ones((3, 2)), {"dataset_hash": "d"})
    assert fsynced[-1] == str(tmp_path) and fsynced[-2].startswith(str(path) + ".")
    with np.load(path, allow_pickle=False) as z:
        assert z["logps"].shape == (3, 2) and json.loads(str(z["meta"])) == {"dataset_hash": "d"}
    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_reference_file(path, np.zeros((3, 2)), {})
    assert [p.name for p in tmp_path.iterdir()] == ["ref_logps.npz"]
    with np.load(path, allow_pickle=False) as z:
        assert z["logps"].sum() == 6  # the old file, untouched


def test_checkpoint_tree_is_fsynced_before_its_rename(tmp_path, monkeypatch):
    """save_checkpoint (one process, a stand-in engine): every file of .tmp_step_N (weights,
    tokenizer, plot, JSON) fsynced before the rename to step_N, which precedes `latest`."""
    import torch

    import trainer.checkpoint as ck
    from trainer.dist import DistInfo
    events: list[tuple[str, str]] = []
    real_tree, real_replace = ck.fsync_tree, ck.os.replace

    def tree(d):
        events.append(("fsync_tree", Path(d).name))
        events.extend(("file", str(p.relative_to(d))) for p in sorted(Path(d).rglob("*"))
                      if p.is_file())
        return real_tree(d)

    def replace(src, dst):
        events.append(("rename", f"{Path(src).name}->{Path(dst).name}"))
        return real_replace(src, dst)

    class Module:
        def save_pretrained(self, path, **_):
            Path(path, "model.safetensors").write_bytes(b"weights")

    class Tokenizer:
        def save_pretrained(self, path):
            Path(path, "tokenizer.json").write_text("{}")

    class Engine:
        module = Module()

    monkeypatch.setattr(ck, "fsync_tree", tree)
    monkeypatch.setattr(ck.os, "replace", replace)
    ck.save_checkpoint(engine=Engine(), tokenizer=Tokenizer(), run_dir=tmp_path, step=3,
                       state={"loss_history": [{"step": 1, "loss": 1.0}]}, resolved={},
                       info=DistInfo(0, 0, 1, torch.device("cpu")), zero3=False,
                       save_optimizer=False, use_lora=False, save_total_limit=0)
    # (os.replace is the one os module's: the JSON writers' own renames are recorded too)
    names = [e for e in events if e[0] == "fsync_tree" or e[1].startswith(".tmp_step")]
    assert names == [("fsync_tree", ".tmp_step_3"), ("rename", ".tmp_step_3->step_3")], events
    synced_files = {name for kind, name in events if kind == "file"}
    assert {"model.safetensors", "tokenizer.json", "loss_curve.png", "trainer_state.json",
            "rng/rank_0.json"} <= synced_files, synced_files
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_3\n"


def test_encoder_stats_and_plot_are_durable(tmp_path, fsynced):
    from encoder.stats import plot_lengths, write_stats_json
    write_stats_json(tmp_path / "stats.json", {"documents": 2})
    plot_lengths(tmp_path / "lengths.png", [3, 5], max_length=4, title="t")
    assert [p for p in fsynced if not p.endswith(".tmp")] == [str(tmp_path)] * 2
    assert json.loads((tmp_path / "stats.json").read_text()) == {"documents": 2}
    assert (tmp_path / "lengths.png").read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lengths.png", "stats.json"]


def test_verdict_cache_uses_the_shared_writer(tmp_path, fsynced):
    from encoder.verdict_cache import VerdictCache
    cache = VerdictCache(tmp_path, {"tokenizer_json": "ab", "schema": 1})
    assert cache.record_vocab_hash("h")
    assert fsynced[-1] == str(cache.path.parent)
    assert [p.name for p in cache.path.parent.iterdir()] == [cache.path.name]
