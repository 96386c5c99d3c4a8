"""Issue 7 item 6: disk full / unwritable output. The encoder and the trainer stop with a one-line
error (exit != 0, no traceback wall); nothing that looks complete is left behind; a previous
checkpoint stays intact.

"Disk full" is simulated with RLIMIT_FSIZE in the child (SIGXFSZ ignored, so write() fails with
EFBIG like ENOSPC would); "read-only" with a 0o555 directory, the child's DAC-override
capabilities dropped (the tests run as root, which would otherwise ignore the mode bits).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from reliability_testlib import (REPO, child_env, drop_dac_override, encoder_cmd,
                                 limit_file_size)
from shardfmt import IncompleteDatasetError, open_dataset

PLUGIN = Path(__file__).resolve().parent / "faulty_plugin.py"


def encoder_flags(tokenizer_dir: str, out: Path) -> list[str]:
    return ["--tokenizer_path", tokenizer_dir, "--data_loader_path", str(PLUGIN),
            "--encode_type", "qa", "--max_length", "128", "--tokens_per_file", "2000",
            "--output_path", str(out), "--corpus_name", "c"]


def assert_one_line_error(proc: subprocess.CompletedProcess, prog: str, *needles: str) -> str:
    assert proc.returncode not in (0, None) and proc.returncode > 0, proc.returncode
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    # exactly one error line (progress bars may still print as the process exits)
    [line] = [l for l in proc.stderr.splitlines() if l.startswith(f"{prog}: error")] or [
        proc.stderr[-2000:]]
    assert line.startswith(f"{prog}: error"), line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


# (case, preexec_fn, what the error line names)
ENCODER_CASES = {
    # each shard is ~4 KB (.bin); 1 KB fails while writing the first shard
    "fsize_1kb_mid_shard": (limit_file_size(1024), ("File too large", "[EFBIG]")),
    # shards (~4 KB) fit; the manifest (~20 KB, 28 shards) does not
    "fsize_8kb_at_manifest": (limit_file_size(8192), ("File too large", "manifest.json")),
    "read_only_output_dir": (drop_dac_override, ("Permission denied", "[EACCES]", "ro")),
}


@pytest.fixture(scope="module")
def encoder_failures(hermetic_tokenizer_dir, tmp_path_factory) -> dict:
    """The three failing encoder runs, started together (their start-up dominates)."""
    root = tmp_path_factory.mktemp("diskfull")
    procs = {}
    for case, (pre, _) in ENCODER_CASES.items():
        out = root / case
        if case == "read_only_output_dir":
            out = root / case / "ro"
            out.mkdir(parents=True)
            out.chmod(0o555)
        procs[case] = (out, subprocess.Popen(encoder_cmd(*encoder_flags(hermetic_tokenizer_dir,
                                                                          out)),
                                             env=child_env(), preexec_fn=pre, text=True,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = {}
    for case, (out, proc) in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        results[case] = (out, subprocess.CompletedProcess(proc.args, proc.returncode, stdout,
                                                          stderr))
    yield results
    (root / "read_only_output_dir" / "ro").chmod(0o755)


@pytest.mark.parametrize("case", list(ENCODER_CASES))
def test_encoder_write_failure_is_one_clear_line(case, encoder_failures, hermetic_tokenizer_dir):
    out, proc = encoder_failures[case]
    assert_one_line_error(proc, "llm-encode", *ENCODER_CASES[case][1])
    d = out / "c"
    names = sorted(p.name for p in d.iterdir()) if d.is_dir() else []
    assert "manifest.json" not in names and not any(n.endswith(".tmp") for n in names), names
    with pytest.raises((IncompleteDatasetError, FileNotFoundError)):
        open_dataset(str(d))
    if case.startswith("fsize"):  # with room again, a rerun completes
        from encoder.main import main
        assert main(encoder_flags(hermetic_tokenizer_dir, out) + ["--overwrite"]) == 0
        assert len(open_dataset(str(d))) > 0


# ------------------------------------------------------------------------------------- trainer
def train_cmd(assets: dict, out: Path, *extra: str) -> list[str]:
    import sys
    return [sys.executable, str(REPO / "trainer" / "train.py"), "--model_path",
            str(assets["llama"]), "--data_path", str(assets["train"]), "--output_path", str(out),
            "--micro_batch_size", "2", "--learning_rate", "3e-3", "--seed", "7", "--precision",
            "fp32", "--num_workers", "0", "--logging_steps", "1", *extra]


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    from trainer_testlib import run_env
    return subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True,
                          timeout=300, **kw)


def test_trainer_unwritable_output_fails_before_loading(trainer_assets, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        proc = run(train_cmd(trainer_assets, ro / "runs", "--max_steps", "2"),
                   preexec_fn=drop_dac_override)
    finally:
        ro.chmod(0o755)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"--output_path {ro / 'runs'}: directory {ro} is not writable" in proc.stderr
    assert not (ro / "runs").exists()
    afile = tmp_path / "a_file"
    afile.write_text("x")
    proc = run(train_cmd(trainer_assets, afile / "runs", "--max_steps", "2"))
    assert proc.returncode == 2 and f"{afile} is not a directory" in proc.stderr


@pytest.mark.slow
def test_trainer_checkpoint_save_fails_previous_intact(trainer_assets, tmp_path):
    """Run 1 saves step_2. Run 2 resumes it in the same run dir with RLIMIT_FSIZE below the
    weights' size: saving step_4 fails -> one clear line, exit != 0, `latest` still names step_2,
    which still loads with from_pretrained; no step_4 exists."""
    import torch
    from transformers import AutoModelForCausalLM
    out = tmp_path / "runs"
    common = ("--no_timestamp", "--save_name", "r", "--save_steps", "2", "--save_optimizer")
    proc = run(train_cmd(trainer_assets, out, "--max_steps", "2", *common))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpts = out / "r" / "checkpoints"
    step2 = ckpts / "step_2"
    before = {p.relative_to(step2): p.read_bytes() for p in step2.rglob("*") if p.is_file()}
    weights = (step2 / "model.safetensors").stat().st_size
    proc = run(train_cmd(trainer_assets, out, "--max_steps", "4", *common, "--load_ckpt_path",
                         str(out / "r")), preexec_fn=limit_file_size(weights // 2))
    line = assert_one_line_error(proc, "trainer", "error at step 4", "File too large",
                                 "step_2")
    assert (ckpts / "latest").read_text().strip() == "step_2", line
    assert not (ckpts / "step_4").exists()
    after = {p.relative_to(step2): p.read_bytes() for p in step2.rglob("*") if p.is_file()}
    assert after == before
    model = AutoModelForCausalLM.from_pretrained(str(step2), dtype=torch.float32)
    assert model.config.vocab_size == 124
    assert json.loads((step2 / "trainer_state.json").read_text())["step"] == 2


def test_trainer_log_write_fails_mid_run(trainer_assets, tmp_path):
    """The disk fills while train_log.jsonl is being appended to (RLIMIT_FSIZE 400 B: the first
    line or two fit, then a line is cut short and refused): one line naming the log and the fix,
    exit 1, the log cut back to whole lines (a resumed run appends to valid JSONL), and no
    checkpoint that looks complete."""
    out = tmp_path / "runs"
    proc = run(train_cmd(trainer_assets, out, "--max_steps", "6", "--no_timestamp",
                         "--save_name", "r"), preexec_fn=limit_file_size(400))
    log = out / "r" / "train_log.jsonl"
    line = assert_one_line_error(proc, "trainer", f"writing {log} failed: File too large [EFBIG]",
                                 "free space on its disk", "no checkpoint was saved yet")
    assert proc.returncode == 1
    records = [json.loads(l) for l in log.read_text().splitlines()]  # whole lines only
    assert log.read_text().endswith("\n") or not records
    assert f"error at step {len(records) + 1}:" in line, (line, records)
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    ckpts = out / "r" / "checkpoints"
    assert not ckpts.exists() or not any(ckpts.iterdir()), list(ckpts.iterdir())
