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
from trainer_testlib import (VENV_BIN, check_ok, free_port, losses, run_env, run_train,
                             run_trains)

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


def start_run(assets: dict, out: Path, point: str, nproc: int) -> tuple[subprocess.Popen, Path]:
    """Start the hooked run that stops every rank at `point` of the step-4 save (and its marker)."""
    mark = out.parent / f"{point}.mark"
    env = run_env()
    env.update(RELI_KILL_POINT=point, RELI_KILL_STEP=str(KILL_STEP), RELI_MARK=str(mark))
    proc = subprocess.Popen(launch_cmd(nproc) + train_args(assets, out), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    return proc, mark


def kill_at_mark(proc: subprocess.Popen, mark: Path, out: Path) -> Path:
    """SIGKILL the whole run once it has stopped at its point; its run dir."""
    try:
        wait_for(mark, proc, timeout=300)
    finally:
        kill_group(proc)
    return out / "run"


def kill_during_save(assets: dict, out: Path, point: str, nproc: int) -> Path:
    return kill_at_mark(*start_run(assets, out, point, nproc), out)


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
def killed_1proc(trainer_assets, tmp_path_factory) -> dict:
    """The two 1-process kill points, state_written and after_latest: each run killed, checked,
    and resumed -> point: {"reference", "resumed", "run_dir"}. The two runs are independent (own
    output dirs, one process each), so both kills, and then both resumes, run side by side."""
    outs = {point: tmp_path_factory.mktemp(point) for point in ("state_written", "after_latest")}
    started = {point: start_run(trainer_assets, out, point, 1) for point, out in outs.items()}
    try:
        run_dirs = {point: kill_at_mark(*started[point], outs[point]) for point in outs}
    finally:
        for proc, _ in started.values():
            kill_group(proc)
    result = {point: {"reference": logged_losses(run_dir), "run_dir": run_dir}
              for point, run_dir in run_dirs.items()}

    # state_written: step_4 was complete in .tmp_step_4 but never renamed -> latest is step_2
    run_dir = run_dirs["state_written"]
    assert sorted(result["state_written"]["reference"]) == [1, 2, 3, 4]
    check_after_kill(run_dir, "step_2")
    assert (run_dir / "checkpoints" / f".tmp_step_{KILL_STEP}").is_dir()
    # after_latest: step_4 renamed into place and named by latest
    check_after_kill(run_dirs["after_latest"], f"step_{KILL_STEP}")

    procs = run_trains([train_args(trainer_assets, outs[point]) + ["--load_ckpt_path",
                                                                   str(run_dirs[point])]
                        for point in outs])
    for point, proc in zip(outs, procs):
        check_ok(proc)
        result[point]["resumed"] = losses(run_dirs[point] / "checkpoints" / f"step_{MAX_STEPS}")
    return result


def assert_same(a: list[float], b: list[float]) -> None:
    assert len(a) == len(b) and np.max(np.abs(np.array(a) - np.array(b))) <= 1e-6, (a, b)


def test_killed_after_state_written_before_rename_1proc(killed_1proc):
    r = killed_1proc["state_written"]
    assert len(r["resumed"]) == MAX_STEPS
    assert_same(r["resumed"][:KILL_STEP], [r["reference"][s] for s in range(1, KILL_STEP + 1)])
    ckpts = r["run_dir"] / "checkpoints"
    assert not list(ckpts.glob(".tmp_*")) and (ckpts / "latest").read_text().strip() == "step_6"


def test_killed_after_latest_updated_1proc(killed_1proc):
    r = killed_1proc["after_latest"]
    assert_same(r["resumed"][:KILL_STEP], [r["reference"][s] for s in range(1, KILL_STEP + 1)])
    # steps 5-6 (resumed from step_4) equal steps 5-6 of the run resumed from step_2
    assert_same(r["resumed"], killed_1proc["state_written"]["resumed"])


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
