"""Issue 7 item 5: SIGKILL a training run during a checkpoint save. The previous checkpoint stays
loadable, `latest` never names an incomplete directory, and resuming (same command +
--load_ckpt_path RUN_DIR) reproduces the uninterrupted loss curve within 1e-6 (--save_optimizer,
so optimizer/scheduler/RNG are restored exactly).

The kill points are deterministic: hooked_train.py (test code) runs the unchanged trainer but stops
every rank at the chosen point of the step-4 save and writes a marker; the test then SIGKILLs the
whole process group (launcher and ranks). The killed run's own train_log.jsonl (one line per step,
flushed) is the uninterrupted reference for steps 1-4.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from reliability_testlib import REPO, kill_group, wait_for
from trainer_testlib import VENV_BIN, free_port, losses, run_env, run_train

pytestmark = pytest.mark.slow

HOOKED = Path(__file__).resolve().parent / "hooked_train.py"
KILL_STEP = 4
MAX_STEPS = 6


def train_args(assets: dict, out: Path) -> list[str]:
    return ["--model_path", str(assets["llama"]), "--data_path", str(assets["train"]),
            "--output_path", str(out), "--no_timestamp", "--save_name", "run",
            "--max_steps", str(MAX_STEPS), "--save_steps", "2", "--save_optimizer",
            "--micro_batch_size", "1", "--gradient_accumulation_steps", "2",
            "--learning_rate", "3e-3", "--lr_scheduler", "cosine", "--warmup_ratio", "0.2",
            "--logging_steps", "1", "--seed", "7", "--precision", "fp32", "--num_workers", "0",
            "--zero_stage", "2"]


def launch_cmd(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, str(HOOKED)]
    return [str(VENV_BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port",
            str(free_port()), str(HOOKED)]


def kill_during_save(assets: dict, out: Path, point: str, nproc: int) -> Path:
    mark = out.parent / f"{point}.mark"
    env = run_env()
    env.update(RELI_KILL_POINT=point, RELI_KILL_STEP=str(KILL_STEP), RELI_MARK=str(mark))
    proc = subprocess.Popen(launch_cmd(nproc) + train_args(assets, out), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        wait_for(mark, proc, timeout=300)
    finally:
        kill_group(proc)
    return out / "run"


def logged_losses(run_dir: Path) -> dict[int, float]:
    lines = [json.loads(l) for l in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def check_after_kill(run_dir: Path, expect_latest: str) -> Path:
    import torch
    from transformers import AutoModelForCausalLM
    ckpts = run_dir / "checkpoints"
    latest = (ckpts / "latest").read_text().strip()
    assert latest == expect_latest
    ckpt = ckpts / latest
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == int(latest.split("_")[1])
    assert (ckpt / "deepspeed" / "ds").is_dir()
    AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)  # loadable
    for d in ckpts.glob("step_*"):  # every step_N dir that exists is complete
        assert (d / "trainer_state.json").is_file(), d
    return ckpt


POINTS = [("weights_written", 2, "step_2"), ("state_written", 1, "step_2"),
          ("after_latest", 1, f"step_{KILL_STEP}")]


@pytest.fixture(scope="module")
def resumed_from_step2_1proc(trainer_assets, tmp_path_factory) -> dict:
    """state_written (1 process): killed, checked, resumed -> per-step losses of both runs."""
    out = tmp_path_factory.mktemp("state_written")
    run_dir = kill_during_save(trainer_assets, out, "state_written", 1)
    reference = logged_losses(run_dir)
    assert sorted(reference) == [1, 2, 3, 4]
    check_after_kill(run_dir, "step_2")
    assert (run_dir / "checkpoints" / f".tmp_step_{KILL_STEP}").is_dir()
    run_train(train_args(trainer_assets, out) + ["--load_ckpt_path", str(run_dir)])
    resumed = losses(run_dir / "checkpoints" / f"step_{MAX_STEPS}")
    return {"reference": reference, "resumed": resumed, "run_dir": run_dir}


def assert_same(a: list[float], b: list[float]) -> None:
    assert len(a) == len(b) and np.max(np.abs(np.array(a) - np.array(b))) <= 1e-6, (a, b)


def test_killed_after_state_written_before_rename_1proc(resumed_from_step2_1proc):
    r = resumed_from_step2_1proc
    assert len(r["resumed"]) == MAX_STEPS
    assert_same(r["resumed"][:KILL_STEP], [r["reference"][s] for s in range(1, KILL_STEP + 1)])
    ckpts = r["run_dir"] / "checkpoints"
    assert not list(ckpts.glob(".tmp_*")) and (ckpts / "latest").read_text().strip() == "step_6"


def test_killed_after_latest_updated_1proc(trainer_assets, tmp_path, resumed_from_step2_1proc):
    run_dir = kill_during_save(trainer_assets, tmp_path, "after_latest", 1)
    reference = logged_losses(run_dir)
    check_after_kill(run_dir, f"step_{KILL_STEP}")
    run_train(train_args(trainer_assets, tmp_path) + ["--load_ckpt_path", str(run_dir)])
    resumed = losses(run_dir / "checkpoints" / f"step_{MAX_STEPS}")
    assert_same(resumed[:KILL_STEP], [reference[s] for s in range(1, KILL_STEP + 1)])
    # steps 5-6 (resumed from step_4) equal steps 5-6 of the run resumed from step_2
    assert_same(resumed, resumed_from_step2_1proc["resumed"])


def test_killed_mid_save_two_ranks(trainer_assets, tmp_path):
    run_dir = kill_during_save(trainer_assets, tmp_path, "weights_written", 2)
    reference = logged_losses(run_dir)
    assert sorted(reference) == [1, 2, 3, 4]
    check_after_kill(run_dir, "step_2")
    tmp = run_dir / "checkpoints" / f".tmp_step_{KILL_STEP}"
    assert (tmp / "model.safetensors").is_file() and not (tmp / "trainer_state.json").exists()
    run_train(train_args(trainer_assets, tmp_path) + ["--load_ckpt_path", str(run_dir)],
              launcher="deepspeed", nproc=2)
    resumed = losses(run_dir / "checkpoints" / f"step_{MAX_STEPS}")
    assert len(resumed) == MAX_STEPS
    assert_same(resumed[:KILL_STEP], [reference[s] for s in range(1, KILL_STEP + 1)])
