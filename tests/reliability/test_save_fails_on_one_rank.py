"""A checkpoint save that fails on rank 0 only (its disk is full) must end the whole 2-rank run
promptly with a clear error on every rank — not leave rank 1 waiting at a barrier until the
launcher's timeout — and `latest` must still name the previous complete checkpoint."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from reliability_testlib import REPO, kill_group
from trainer_testlib import VENV_BIN, free_port, run_env

pytestmark = pytest.mark.slow

HOOK = Path(__file__).resolve().parent / "rank0_save_fails.py"


def test_save_failing_on_rank0_ends_every_rank(trainer_assets, tmp_path):
    env = run_env()
    env["RELI_FAIL_STEP"] = "4"
    cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(HOOK), "--model_path", str(trainer_assets["llama"]),
           "--data_path", str(trainer_assets["train"]), "--output_path", str(tmp_path),
           "--no_timestamp", "--save_name", "run", "--max_steps", "6", "--save_steps", "2",
           "--save_optimizer", "--micro_batch_size", "1", "--learning_rate", "3e-3",
           "--precision", "fp32", "--num_workers", "0", "--zero_stage", "2"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=400)   # a hang would sit at the barrier for 30 min
    finally:
        kill_group(proc)
    assert proc.returncode == 1, out[-3000:]        # "the run failed": every rank exits 1
    errors = [line for line in out.splitlines() if "trainer: error at step 4" in line]
    assert len(errors) == 2, out[-3000:]                   # both ranks report and exit
    assert any("No space left on device (injected on rank 0)" in e for e in errors)
    assert any("1 other rank(s) failed while writing the model weights" in e for e in errors)
    assert all("latest names step_2" in e for e in errors)
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_2"
    assert not (ckpts / "step_4").exists()
    assert (ckpts / "step_2" / "trainer_state.json").is_file()
