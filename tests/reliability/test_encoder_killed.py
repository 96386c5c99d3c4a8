"""Issue 7 item 1: SIGKILL `python encoder/main.py` at known points; the reader must refuse the
directory as incomplete, and a rerun with --overwrite must be byte-identical to an uninterrupted run.
Killed during an --overwrite of a complete dataset, the old dataset must still be there, unchanged.

The kill points are made deterministic from outside the encoder: faulty_plugin.py (user code the
encoder loads) writes a marker file and sleeps at the chosen point; the test waits for the marker
and SIGKILLs the process group.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from reliability_testlib import child_env, encoder_cmd, kill_group, wait_for
from shardfmt import IncompleteDatasetError, open_dataset

PLUGIN = Path(__file__).resolve().parent / "faulty_plugin.py"
CORPUS = "c"


def flags(tokenizer_dir: str, out: Path, *extra: str) -> list[str]:
    # small shards (~20 of them) and a small packing window, so samples stream to disk early
    return ["--tokenizer_path", tokenizer_dir, "--data_loader_path", str(PLUGIN),
            "--encode_type", "qa", "--max_length", "128", "--merge_data", "--pack_window", "100",
            "--tokens_per_file", "2000", "--output_path", str(out), "--corpus_name", CORPUS,
            *extra]


def run_in_process(argv: list[str]) -> None:
    from encoder.main import main
    assert main(argv) == 0


def dataset_bytes(d: Path) -> dict[str, bytes]:
    """Every file's bytes; the manifest without its creation time."""
    files = {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}
    manifest = json.loads(files.pop("manifest.json"))
    manifest.pop("created_unix")
    files["manifest.json"] = json.dumps(manifest, sort_keys=True).encode()
    return files


@pytest.fixture(scope="module")
def baseline_dir(hermetic_tokenizer_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("baseline")
    run_in_process(flags(hermetic_tokenizer_dir, out))
    return out / CORPUS


@pytest.fixture(scope="module")
def baseline(baseline_dir) -> dict[str, bytes]:
    files = dataset_bytes(baseline_dir)
    assert sum(n.endswith(".bin") for n in files) >= 10  # shards rolled many times
    assert "stats.json" in files
    return files


def listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


# trial id -> (plugin env, extra flags, what must be on disk at the kill)
POINTS = {
    "tokenizing_row_5": ({"RELI_BLOCK_ROW": "5"}, (),
                         lambda names: not any(n.endswith(".idx") for n in names)),
    "mid_shard_row_1100": ({"RELI_BLOCK_ROW": "1100"}, (),
                           lambda names: any(n.endswith(".idx") for n in names)
                           and any(n.endswith(".bin.tmp") for n in names)),
    "between_bin_and_idx_rename": ({"RELI_BLOCK_AT": "idx_rename"}, (),
                                   lambda names: "c_00003.bin" in names
                                   and "c_00003.idx.tmp" in names),
    "between_last_shard_and_manifest": ({"RELI_BLOCK_AT": "before_manifest"}, (),
                                        lambda names: not any(n.endswith(".tmp") for n in names)
                                        and "c_00010.idx" in names),
    "manifest_tmp_not_renamed": ({"RELI_BLOCK_AT": "manifest_rename"}, (),
                                 lambda names: any(n.startswith("manifest.json.") and
                                                   n.endswith(".tmp") for n in names)),
}
# --overwrite of a complete dataset writes beside it (.c.incoming/) and swaps at the end: killed
# mid-way, the old dataset is still there, complete and byte-identical (checked separately below)
OVERWRITE_POINT = ({"RELI_BLOCK_ROW": "1100"}, ("--overwrite",),
                   lambda names: any(n.endswith(".bin.tmp") for n in names))
ALL_POINTS = {**POINTS, "overwrite_of_complete_dataset_row_1100": OVERWRITE_POINT}


def settle(directory: Path, reached, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while not reached(listing(directory)) and time.time() < deadline:
        time.sleep(0.05)


@pytest.fixture(scope="module")
def killed(baseline_dir, hermetic_tokenizer_dir, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """Start one encoder per kill point, all at once (their start-up dominates), wait until each
    reaches its point, SIGKILL it. Returns point -> (its output dir, the marker's text)."""
    root = tmp_path_factory.mktemp("killed")
    procs = {}
    for point, (env, extra, _) in ALL_POINTS.items():
        out = root / point
        if "--overwrite" in extra:
            shutil.copytree(baseline_dir, out / CORPUS)
        procs[point] = (out, subprocess.Popen(
            encoder_cmd(*flags(hermetic_tokenizer_dir, out, *extra)),
            env=child_env(RELI_MARK=str(root / f"{point}.mark"), **env),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            start_new_session=True))
    result = {}
    try:
        for point, (out, proc) in procs.items():
            mark = root / f"{point}.mark"
            wait_for(mark, proc)
            # the plugin runs in a reader thread ahead of the writer: a block in the plugin is
            # reached before the writer has caught up, so wait (bounded) for the state on disk
            settle(out / CORPUS, ALL_POINTS[point][2])
            kill_group(proc)
            assert proc.returncode == -9, point  # SIGKILL, not a clean exit
            result[point] = (out, mark.read_text())
    finally:
        for _, proc in procs.values():
            kill_group(proc)
    return result


@pytest.mark.parametrize("point", list(POINTS))
def test_killed_encoder_leaves_incomplete_then_rerun_is_identical(point, killed, baseline,
                                                                   hermetic_tokenizer_dir, capsys):
    out, where = killed[point]
    names = listing(out / CORPUS)
    assert POINTS[point][2](names), (where, names)
    assert "manifest.json" not in names
    with pytest.raises(IncompleteDatasetError, match="incomplete"):
        open_dataset(str(out / CORPUS))
    # a rerun without --overwrite refuses a non-empty directory, naming it incomplete; with
    # --overwrite it completes, byte-identical to the uninterrupted run
    from encoder.main import main
    if names:
        assert main(flags(hermetic_tokenizer_dir, out)) == 2
        assert "already holds an incomplete dataset" in capsys.readouterr().err
    run_in_process(flags(hermetic_tokenizer_dir, out, "--overwrite"))
    assert dataset_bytes(out / CORPUS) == baseline
    assert len(open_dataset(str(out / CORPUS))) > 0


def test_killed_overwrite_keeps_the_old_dataset(killed, baseline, hermetic_tokenizer_dir):
    out, where = killed["overwrite_of_complete_dataset_row_1100"]
    staging = out / f".{CORPUS}.incoming"
    assert OVERWRITE_POINT[2](listing(staging)), (where, listing(staging))
    assert dataset_bytes(out / CORPUS) == baseline            # untouched, complete
    assert len(open_dataset(str(out / CORPUS))) > 0
    run_in_process(flags(hermetic_tokenizer_dir, out, "--overwrite"))
    assert dataset_bytes(out / CORPUS) == baseline
    assert listing(out) == [CORPUS]                          # the stale staging dir was removed
