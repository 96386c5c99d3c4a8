"""encoder.distributed: parts + merge equal a single-process run, relaunches skip complete parts,
bad input is refused; the Slurm script's dry run; and (slow) a real 2-node local Ray cluster
where one worker is killed in the middle of a part."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest

from encoder_testlib import PLUGINS, REPO
from ray_local_cluster import LocalRayCluster, our_processes, still_alive, wait_for
from shardfmt import open_dataset

SLOW_PLUGIN = str(Path(__file__).with_name("slow_part_plugin.py"))


def read_samples(path) -> list[tuple[list[int], list[bool], list[int]]]:
    ds = open_dataset(str(path))
    return [(ds[i].input_ids.tolist(), ds[i].loss_mask.tolist(), ds[i].doc_lens.tolist())
            for i in range(len(ds))]


def docs_of(path) -> Counter:
    """Multiset of (document ids, mask) over a dataset: what packing must preserve."""
    out: Counter = Counter()
    for ids, mask, lens in read_samples(path):
        pos = 0
        for n in lens:
            out[(tuple(ids[pos:pos + n]), tuple(mask[pos:pos + n]))] += 1
            pos += n
    return out


@pytest.fixture
def dist(capsys):
    """dist(*flags) -> (exit code, stdout, stderr) of encoder.distributed.main, in-process."""
    from encoder.distributed import main

    def run(*flags: str) -> tuple[int, str, str]:
        code = main([str(f) for f in flags])
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    return run


@pytest.fixture
def single(run_cli):
    """single(*encoder flags, out=DIR) -> the dataset of one plain encoder run."""
    def run(*flags, out: Path) -> Path:
        code, _, err = run_cli(*flags, out=out)
        assert code == 0, err
        return out / "c"
    return run


def qa_flags(tok: str, plugin: str = SLOW_PLUGIN, *extra: str) -> list[str]:
    return ["--tokenizer_path", tok, "--data_loader_path", plugin, "--encode_type", "qa",
            "--max_length", "64", *extra]


def test_local_parts_merge_equal_a_single_run_and_relaunch_skips(dist, single, tmp_path,
                                                                  hermetic_tokenizer_dir):
    flags = qa_flags(hermetic_tokenizer_dir, SLOW_PLUGIN, "--data_loader_args", "rows=90")
    ref = single(*flags, out=tmp_path / "single")
    code, out, err = dist("--engine", "local", "--num_parts", 3, *flags,
                          "--output_path", tmp_path / "d", "--corpus_name", "c")
    assert code == 0, err
    assert "parts 3/3 done" in err and "tokens/s" in err and "merged 3 parts" in out
    assert read_samples(tmp_path / "d" / "c") == read_samples(ref)    # same samples, same order
    (job,) = (tmp_path / "d" / "c.parts").iterdir()
    assert json.loads((job / "job.json").read_text())["num_parts"] == 3
    assert not list(job.glob(".attempt-*"))
    manifest = (tmp_path / "d" / "c" / "manifest.json").read_bytes()
    code, out, err = dist("--engine", "local", "--num_parts", 3, *flags,
                          "--output_path", tmp_path / "d", "--corpus_name", "c")
    assert code == 0 and "3 complete, 0 to encode" in err, err
    assert json.loads((tmp_path / "d" / "c" / "manifest.json").read_bytes())["shards"] == \
        json.loads(manifest)["shards"]


def test_packed_and_pretrain_parts_keep_every_document(dist, single, tmp_path,
                                                       hermetic_tokenizer_dir):
    packed = qa_flags(hermetic_tokenizer_dir, SLOW_PLUGIN, "--data_loader_args", "rows=60",
                      "--merge_data", "--max_length", "128")
    ref = single(*packed, out=tmp_path / "single")
    assert dist("--engine", "local", "--num_parts", 2, *packed, "--output_path", tmp_path / "d",
                "--corpus_name", "c")[0] == 0
    assert docs_of(tmp_path / "d" / "c") == docs_of(ref)      # the same documents, each once
    text = ["--tokenizer_path", hermetic_tokenizer_dir, "--data_loader_path",
            str(PLUGINS / "text.py"), "--encode_type", "pretrain", "--max_length", "32"]
    ref = single(*text, out=tmp_path / "single_text")
    assert dist("--engine", "local", "--num_parts", 2, *text, "--output_path", tmp_path / "t",
                "--corpus_name", "c")[0] == 0
    flat = lambda path: [t for ids, _, _ in read_samples(path) for t in ids]  # noqa: E731
    assert flat(tmp_path / "t" / "c") == flat(ref)   # pretrain: the same token stream


def test_slurm_style_only_parts_then_merge_only(dist, tmp_path, hermetic_tokenizer_dir):
    flags = [*qa_flags(hermetic_tokenizer_dir, SLOW_PLUGIN, "--data_loader_args", "rows=20"),
             "--output_path", tmp_path / "d", "--corpus_name", "c"]
    assert dist("--engine", "local", "--num_parts", 2, "--only_parts", "1", *flags)[0] == 0
    assert not (tmp_path / "d" / "c").exists()
    code, _, err = dist("--engine", "local", "--num_parts", 2, "--merge_only", *flags)
    assert code == 1 and "1 of 2 parts are not complete (0)" in err, err
    assert dist("--engine", "local", "--num_parts", 2, "--only_parts", "0", *flags)[0] == 0
    assert dist("--engine", "local", "--num_parts", 2, "--merge_only", *flags)[0] == 0
    assert len(open_dataset(str(tmp_path / "d" / "c"))) == 20


def test_bad_rows_flags_and_existing_output(dist, write_plugin, tmp_path, hermetic_tokenizer_dir):
    rows = [{"q": f"q{i}", "a": f"a{i}"} for i in range(6)] + [{"q": "no answer"}]
    base = [*qa_flags(hermetic_tokenizer_dir, write_plugin(rows)),
            "--output_path", tmp_path / "d", "--corpus_name", "c"]
    code, _, err = dist("--engine", "local", "--num_parts", 2, *base)
    assert code == 2 and "part 1: RowError" in err and "row 6" in err and "'a' is missing" in err
    code, _, err = dist("--engine", "local", "--num_parts", 2, "--part", "0/2", *base)
    assert code == 2 and "--part is set by encoder.distributed" in err
    code, _, err = dist("--engine", "local", "--num_parts", 0, *base)
    assert code == 2 and "--num_parts 0" in err
    flaky = write_plugin(code="def data_loader(part_index=None, num_parts=None):\n"
                               "    yield {'q': 'q', 'a': 'a'}\n"
                               "    if part_index == 1:\n"
                               "        raise ConnectionResetError('peer reset')\n", name="flaky.py")
    code, _, err = dist("--engine", "local", "--num_parts", 2, *qa_flags(hermetic_tokenizer_dir,
                        flaky), "--output_path", tmp_path / "f", "--corpus_name", "c")
    assert code == 1 and "part 1 failed: PluginError" in err and "re-run the same command" in err
    (tmp_path / "d" / "c").mkdir(parents=True, exist_ok=True)
    (tmp_path / "d" / "c" / "manifest.json").write_text("{}")
    good = [*qa_flags(hermetic_tokenizer_dir, SLOW_PLUGIN, "--data_loader_args", "rows=8"),
            "--output_path", tmp_path / "d", "--corpus_name", "c"]
    code, _, err = dist("--engine", "local", "--num_parts", 2, *good)
    assert code == 2 and "already holds a complete dataset; pass --overwrite" in err
    assert dist("--engine", "local", "--num_parts", 2, *good, "--overwrite")[0] == 0
    assert len(open_dataset(str(tmp_path / "d" / "c"))) == 8


def test_config_file_values_reach_every_part(dist, single, tmp_path, hermetic_tokenizer_dir):
    """--config RUN.yaml is read as encoder/main.py reads it (the command line wins), and the
    parts get the resolved flags: the merged dataset equals a plain run with those flags."""
    import yaml
    from encoder.distributed import parse_command

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"tokenizer_path": hermetic_tokenizer_dir,
                                   "data_loader_path": SLOW_PLUGIN, "data_loader_args": ["rows=12"],
                                   "encode_type": "qa", "max_length": 48, "merge_data": True}))
    out = ["--output_path", str(tmp_path / "d"), "--corpus_name", "c"]
    ours, enc, argv = parse_command(["--num_parts", "2", "--config", str(cfg), *out,
                                     "--max_length", "40"])
    assert (enc.max_length, enc.merge_data, enc.data_loader_args) == (40, True, ["rows=12"])
    assert "--config" not in argv and "--merge_data" in argv
    code, _, err = dist("--engine", "local", "--num_parts", 2, "--config", cfg, *out)
    assert code == 0, err
    ref = single(*qa_flags(hermetic_tokenizer_dir, SLOW_PLUGIN, "--data_loader_args", "rows=12",
                           "--max_length", "48", "--merge_data"), out=tmp_path / "single")
    assert docs_of(tmp_path / "d" / "c") == docs_of(ref)
    assert open_dataset(str(tmp_path / "d" / "c")).manifest["max_length"] == 48
    cfg.write_text("num_parts: 2\n")   # our own flags stay on the command line: exit 2, named
    code, _, err = dist("--engine", "local", "--num_parts", 2, "--config", cfg, *out)
    assert code == 2 and "'num_parts'" in err and "on the command line" in err, err


def test_run_local_exit_codes_usage_and_bugs(dist, tmp_path, hermetic_tokenizer_dir,
                                            monkeypatch):
    """A UsageError of one part's flags is bad usage (exit 2, not a 'failed part'); a bug (any
    other exception) propagates with its traceback instead of becoming exit 1."""
    import encoder.distributed as distributed
    from encoder.errors import UsageError

    real_check = distributed.check_args

    def check(args):
        if args.part:
            raise UsageError(f"--part {args.part}: refused for this test")
        real_check(args)

    flags = ["--engine", "local", "--num_parts", 2,
             *qa_flags(hermetic_tokenizer_dir, SLOW_PLUGIN, "--data_loader_args", "rows=4"),
             "--output_path", tmp_path / "d", "--corpus_name", "c"]
    monkeypatch.setattr(distributed, "check_args", check)
    code, _, err = dist(*flags)
    assert code == 2 and "part 0: UsageError: --part 0/2: refused for this test" in err, err
    assert "part 0 failed" not in err and "re-run the same command" not in err
    monkeypatch.setattr(distributed, "check_args", real_check)

    def bug(*a, **k):
        raise ZeroDivisionError("a bug in the encoder")
    monkeypatch.setattr("encoder.main.run", bug)
    with pytest.raises(ZeroDivisionError, match="a bug in the encoder"):
        dist(*flags)


def test_help_lists_our_flags_and_the_encoders():
    res = subprocess.run([sys.executable, "-m", "encoder.distributed", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    for flag in ("--engine", "--address", "--num_parts", "--cpus_per_part", "--max_retries",
                 "--only_parts", "--merge_only", "--tokenizer_path", "--merge_data"):
        assert flag in res.stdout


# -- Slurm ----------------------------------------------------------------------------------------
def test_slurm_script_dry_run_prints_the_array_and_the_dependent_merge():
    script = REPO / "run_scripts" / "encode_slurm.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    res = subprocess.run(["bash", str(script)], env={**os.environ, "DRY_RUN": "1"}, cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("sbatch")]
    assert len(lines) == 2, res.stdout
    assert "--array=0-7" in lines[0] and "--only_parts" in lines[0]
    assert "--dependency=afterok:" in lines[1] and "--merge_only" in lines[1]


FAKE_SBATCH = """#!/usr/bin/env python3
# Stands in for Slurm's sbatch: runs --wrap now, once per array index (SLURM_ARRAY_TASK_ID), logs
# to --output (%a = index); checks the merge depends on the array job it printed.
import os, subprocess, sys
opts = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
def run(env, index=""):
    with open(opts["output"].replace("%a", index), "w") as log:
        subprocess.run(["bash", "-c", opts["wrap"]], env=env, stdout=log, stderr=log, check=True)
if "array" in opts:
    lo, hi = opts["array"].split("%")[0].split("-")
    for i in range(int(lo), int(hi) + 1):
        run({**os.environ, "SLURM_ARRAY_TASK_ID": str(i)}, str(i))
    print("4242")
else:
    assert opts["dependency"] == "afterok:4242", opts
    run(dict(os.environ))
    print("4243")
"""


def test_slurm_script_runs_its_array_and_merge_with_a_stand_in_sbatch(tmp_path, single,
                                                                      hermetic_tokenizer_dir):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "TOKENIZER":
           hermetic_tokenizer_dir, "PLUGIN": SLOW_PLUGIN, "PLUGIN_ARGS": "rows=30",
           "ENCODE_TYPE": "qa", "TEMPLATE": "none", "CORPUS": "c", "OUTPUT": str(tmp_path / "d"),
           "MAX_LENGTH": "64", "NUM_PARTS": "3", "CPUS_PER_TASK": "1", "PYTHON": sys.executable}
    res = subprocess.run(["bash", str(REPO / "run_scripts" / "encode_slurm.sh")], env=env,
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "submitted array job 4242" in res.stdout and "submitted merge job 4243" in res.stdout
    ref = single(*qa_flags(hermetic_tokenizer_dir, SLOW_PLUGIN, "--data_loader_args", "rows=30"),
                 out=tmp_path / "single")
    assert read_samples(tmp_path / "d" / "c") == read_samples(ref)


# -- a real local Ray cluster: head + a second node, one worker killed mid-part ------------------
@pytest.mark.slow
def test_ray_two_node_cluster_retries_a_killed_part(single, tmp_path, hermetic_tokenizer_dir):
    pytest.importorskip("ray", reason="Ray not installed (pip install 'llm-shards[distributed]')")
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    flags = qa_flags(hermetic_tokenizer_dir, SLOW_PLUGIN)
    ref = single(*flags, "--data_loader_args", "rows=400", out=tmp_path / "single")
    cluster = LocalRayCluster()
    try:
        cluster.start()
        driver = subprocess.Popen(
            [sys.executable, "-m", "encoder.distributed", "--engine", "ray", "--address",
             cluster.address, "--num_parts", "4", "--max_retries", "2", *flags,
             "--data_loader_args", "rows=400", "delay=0.02", f"pid_dir={pid_dir}",
             "--output_path", str(tmp_path / "d"), "--corpus_name", "c"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**cluster.env, "PYTHONPATH": str(REPO)})
        try:
            wait_for(lambda: list(pid_dir.glob("part1-*")) or driver.poll() is not None, 120,
                     "part 1 to start", every=0.02)
            (victim,) = [int(p.name.split("-")[1]) for p in pid_dir.glob("part1-*")]
            assert not list((tmp_path / "d" / "c.parts").glob("*/part-00001-of-00004"))  # mid-part
            os.kill(victim, signal.SIGKILL)
            out, _ = driver.communicate(timeout=240)
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait()
        assert driver.returncode == 0, out
        assert "2 node(s)" in out and "| 1 retried |" in out, out
        second = [int(p.name.split("-")[1]) for p in pid_dir.glob("part1-*") if
                  int(p.name.split("-")[1]) != victim]
        assert second, "part 1 was not run again after its worker was killed"
        assert read_samples(tmp_path / "d" / "c") == read_samples(ref)
        (job,) = (tmp_path / "d" / "c.parts").iterdir()
        assert not list(job.glob(".attempt-*"))
        print(out)
    finally:
        cluster.stop()
    assert cluster.stopped and not still_alive(cluster.stopped | our_processes([], cluster.root))


def test_cross_check_mismatch_fails_the_run_without_retry(dist, write_plugin, tmp_path,
                                                          monkeypatch):
    """A sampled cross-check mismatch is deterministic: encode_part returns it (Ray's
    retry_exceptions never sees an exception to retry), and the run exits 1 naming the part,
    the row and both id lists; no merged manifest."""
    from encoder_testlib import shared_tokenizer_path
    from test_backends import corrupt

    import encoder.backends as backends
    from encoder.distributed import Layout, encode_part, job_identity, make_layout, parse_command

    tok = shared_tokenizer_path("llama2")   # skips without ../shared
    monkeypatch.setattr(backends.GigatokenEncoder, "encode", corrupt("INJECTED"))
    monkeypatch.setattr("encoder.pipeline.BATCH_ROWS", 2)   # row 70 is past the first batch
    rows = [f"plain document number {i}." for i in range(100)]
    rows[70] = "this row is INJECTED with a wrong id"
    flags = ["--tokenizer_path", tok, "--data_loader_path", write_plugin(rows), "--encode_type",
             "pretrain", "--max_length", "64", "--cross_check_every", "1",
             "--output_path", str(tmp_path / "d"), "--corpus_name", "c"]
    code, _, err = dist("--engine", "local", "--num_parts", 2, *flags)
    assert code == 1, err
    assert "part 1 failed: CrossCheckError: cross-check failed at row 70" in err
    assert "gigatoken ids: [" in err and "tokenizers ids: [" in err
    assert "the cross-check failed, which a re-run repeats" in err
    assert "re-run the same command for" not in err
    assert not (tmp_path / "d" / "c" / "manifest.json").exists()
    # what a Ray task gets: a result, not an exception (so max_retries never re-runs it)
    ours, enc, encoder_argv = parse_command(["--num_parts", "2", *flags])
    layout = make_layout(enc, job_identity(enc, 2))
    assert isinstance(layout, Layout)
    result = encode_part(encoder_argv, layout, 1)
    assert result["part"] == 1 and "cross-check failed at row 70" in result["failed"]
    assert not list(layout.job_dir.glob(".attempt-*"))
