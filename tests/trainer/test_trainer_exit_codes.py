"""Every trainer CLI follows the one exit-code convention (trainer/errors.py, README "Exit codes"):
0 ok, 1 the run failed, 2 bad input or usage (a bad flag, a missing or unreadable path), with a
one-line message naming the flag/file; and an internal bug is not swallowed: it escapes main()
with its own type, so Python prints its traceback.

The export/generate/reference_logps cases and train.py's usage cases run in-process (no
interpreter start-up per case; console.install, which sets process-wide warning/log filters, is
stubbed out). Train's success is the shared 2-rank run of conftest.py (zero2_run: run_train
asserts its exit 0); its failed save is one real 1-step `python trainer/train.py`. One 2-rank
DeepSpeed launch (slow) checks that the ranks exit 2 and the launcher passes it on.
"""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path

import numpy as np
import pytest

from trainer_testlib import (LAUNCHER_PYTHON, REPO, VENV_BIN, build_tokenizer, free_port,
                             run_env)

TRAIN_FLAGS = ["--learning_rate", "3e-3", "--seed", "7", "--precision", "fp32", "--num_workers",
               "0", "--logging_steps", "1", "--no_timestamp"]


def train_argv(assets, out, *extra: str) -> list[str]:
    return ["--model_path", str(assets["llama"]), "--data_path", str(assets["train"]),
            "--output_path", str(out), "--max_steps", "1", *TRAIN_FLAGS, *extra]


@pytest.fixture
def train_main(monkeypatch):
    """trainer.train.main without the process-wide console/logging set-up; the launcher variables
    main() sets for a lone process are restored after the test (monkeypatch)."""
    import os

    import trainer.console
    import trainer.train
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, os.environ.get(name, ""))  # recorded: undone after the test
        if not os.environ[name]:
            monkeypatch.delenv(name)
    monkeypatch.setattr(trainer.console, "install", lambda **_: None)
    monkeypatch.setattr(trainer.train, "_setup_logging", lambda: None)
    return trainer.train.main


def fail_disk(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device (injected)")


def internal_bug(*_args, **_kwargs):
    raise KeyError("an internal bug (injected)")


def bad_flag(main, capsys, *required: str) -> None:
    """argparse: an unknown flag (given with the required ones) exits 2 naming it."""
    with pytest.raises(SystemExit) as e:
        main([*required, "--no_such_flag"])
    assert e.value.code == 2
    assert "unrecognized arguments: --no_such_flag" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ train.py
@pytest.fixture(scope="module")
def failed_run(assets, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """`python trainer/train.py` for 1 step whose checkpoint write fails (rank 0's weights write
    raises ENOSPC: tests/reliability/rank0_save_fails.py)."""
    out = tmp_path_factory.mktemp("exit_codes")
    hook = REPO / "tests" / "reliability" / "rank0_save_fails.py"
    proc = subprocess.run([LAUNCHER_PYTHON, str(hook), *train_argv(assets, out, "--save_name", "r")],
                          cwd=REPO, env={**run_env(), "RELI_FAIL_STEP": "1"}, capture_output=True,
                          text=True, timeout=600)
    return out / "r", proc


@pytest.fixture
def trained(zero2_run) -> Path:
    """Success (exit 0) is the shared 2-rank DeepSpeed run of conftest.py (run_train asserts its
    exit code 0): the checkpoint export/generate start from."""
    assert (zero2_run / "checkpoints" / "latest").read_text().strip() == "step_8"
    return zero2_run


def test_train_run_failure_is_1(failed_run):
    run_dir, proc = failed_run
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    [line] = [l for l in proc.stderr.splitlines() if l.startswith("trainer: error")]
    assert "error at step 1" in line and "No space left on device (injected on rank 0)" in line
    assert not (run_dir / "checkpoints" / "step_1").exists()


def test_train_bad_flag_bad_input_and_a_bug(train_main, assets, tmp_path, monkeypatch, capsys):
    import torch

    import trainer.recipe
    from trainer.dist import DistInfo
    bad_flag(train_main, capsys, *train_argv(assets, tmp_path / "out"))
    with pytest.raises(SystemExit) as e:  # validate_args: every problem at once, before loading
        train_main(["--model_path", str(assets["llama"]), "--data_path", str(tmp_path / "nodata"),
                    "--output_path", str(tmp_path / "out"), "--max_steps", "1"])
    assert e.value.code == 2 and f"--data_path {tmp_path / 'nodata'}" in capsys.readouterr().err
    # found by the Trainer: an existing directory that is not a checkpoint (one process: no
    # process group is needed before the lookup fails)
    monkeypatch.setattr(trainer.recipe, "_setup_distributed",
                        lambda: DistInfo(0, 0, 1, torch.device("cpu")))
    not_ckpt = tmp_path / "not_a_checkpoint"
    not_ckpt.mkdir()
    assert train_main(train_argv(assets, tmp_path / "out", "--load_ckpt_path", str(not_ckpt))) == 2
    [line] = [l for l in capsys.readouterr().err.splitlines() if "error before step 1" in l]
    assert f"--load_ckpt_path {not_ckpt}: neither a checkpoint dir" in line
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(trainer.recipe, "open_sources", internal_bug)
    with pytest.raises(KeyError, match="an internal bug"):
        train_main(train_argv(assets, tmp_path / "out"))


def test_train_tracker_write_fails_mid_run_is_1(train_main, assets, tmp_path, monkeypatch, capsys):
    """A tracker's files stop being writable at step 2 (TensorBoard's writer raises ENOSPC, as
    its flush does when the disk is full): exit 1, one line naming the directory and the fix and
    the complete checkpoint to resume from (step_1); no step_2; the resume runs."""
    import trainer.metrics
    real_log = trainer.metrics.TensorBoardTracker.log

    def log(self, metrics, step):
        if step == 2:
            fail_disk()
        real_log(self, metrics, step)
    monkeypatch.setattr(trainer.metrics.TensorBoardTracker, "log", log)
    argv = train_argv(assets, tmp_path / "out", "--save_name", "r", "--save_steps", "1",
                      "--max_steps", "3", "--report_to", "tensorboard")
    assert train_main(argv) == 1
    run_dir = tmp_path / "out" / "r"
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = [l for l in err.splitlines() if l.startswith("trainer: error")]
    assert line == (f"trainer: error at step 2: writing {run_dir / 'tensorboard'} failed: No space "
                    f"left on device (injected) [ENOSPC]; free space on its disk (or raise the "
                    f"quota / file-size limit); checkpoints/latest names step_1 (complete): resume "
                    f"with --load_ckpt_path {run_dir}")
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_1"]
    monkeypatch.setattr(trainer.metrics.TensorBoardTracker, "log", real_log)
    assert train_main([*argv, "--load_ckpt_path", str(run_dir)]) == 0
    assert (ckpts / "latest").read_text().strip() == "step_3"
    # main() ended the process group on success: a later run in this process (a notebook, the
    # next in-process test) starts a fresh one, with no DeepSpeed group cached from the dead one
    assert train_main(train_argv(assets, tmp_path / "again")) == 0


def test_train_resume_with_another_seed_or_data_is_2(train_main, assets, tmp_path, capsys):
    """Resuming with a different --seed or other data would silently change the sample order:
    exit 2 before the model loads, one line naming --load_ckpt_path, the flag, the checkpoint's
    value and the way out."""
    argv = train_argv(assets, tmp_path / "out", "--save_name", "r", "--save_steps", "1")
    assert train_main(argv) == 0
    run_dir = tmp_path / "out" / "r"
    capsys.readouterr()
    for extra, fix in [(["--seed", "8"], "--seed 7"),
                       (["--data_path", str(assets["eval"])], f"--data_path {assets['train']}")]:
        assert train_main([*argv, "--load_ckpt_path", str(run_dir), *extra]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err, err
        [line] = [l for l in err.splitlines() if l.startswith("trainer: error")]
        assert f"--load_ckpt_path {run_dir / 'checkpoints' / 'step_1'}: this run's data order " \
               f"differs from the checkpoint's" in line, line
        assert f"Resume with the checkpoint's {fix}" in line and "start a new run" in line, line
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_1"


def test_train_explicit_tokenizer_that_does_not_load_is_2(train_main, assets, tmp_path,
                                                           monkeypatch, capsys, caplog):
    """An explicit --tokenizer_path whose tokenizer.json is broken: exit 2 naming the flag, the
    path and the error (it used to warn and turn the tokenizer/data check off). The implicit
    tokenizer beside the model keeps its documented fallback: None and a warning."""
    import torch

    import trainer.recipe
    from trainer.dist import DistInfo
    from trainer.errors import UsageError
    from trainer.model import load_training_tokenizer
    monkeypatch.setattr(trainer.recipe, "_setup_distributed",
                        lambda: DistInfo(0, 0, 1, torch.device("cpu")))
    broken = tmp_path / "broken_tok"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    (broken / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    assert train_main(train_argv(assets, tmp_path / "out", "--tokenizer_path", str(broken))) == 2
    err = capsys.readouterr().err
    [line] = [l for l in err.splitlines() if "error before step 1" in l]
    assert f"--tokenizer_path {broken}: the tokenizer does not load (" in line and \
        "point --tokenizer_path at a directory with a valid tokenizer.json" in line, line
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    with pytest.raises(UsageError, match="--tokenizer_path"):
        load_training_tokenizer(broken, flag="--tokenizer_path")
    with caplog.at_level("WARNING", logger="trainer"):
        assert load_training_tokenizer(broken) is None
    assert "tokenizer/data check is skipped" in caplog.text


# ------------------------------------------------------------------------------ trainer.export
def test_export_codes(trained, tmp_path, monkeypatch, capsys):
    import transformers

    import trainer.export
    from trainer.export import main
    out = tmp_path / "exported"
    assert main(["--checkpoint", str(trained), "--output", str(out)]) == 0
    assert (out / "model.safetensors").is_file()
    bad_flag(main, capsys, "--checkpoint", str(trained), "--output", str(tmp_path / "x"))
    missing = tmp_path / "no_run"
    assert main(["--checkpoint", str(missing), "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"--checkpoint {missing}" in err and len(err.splitlines()) == 1
    assert main(["--checkpoint", str(trained), "--output", str(out)]) == 2  # exists: no overwrite
    assert "--overwrite" in capsys.readouterr().err
    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", fail_disk)
    assert main(["--checkpoint", str(trained), "--output", str(tmp_path / "full")]) == 1
    assert "No space left on device (injected)" in capsys.readouterr().err
    assert not (tmp_path / "full").exists() and not (tmp_path / "full.tmp").exists()
    monkeypatch.setattr(trainer.export, "full_model", internal_bug)
    with pytest.raises(KeyError, match="an internal bug"):
        main(["--checkpoint", str(trained), "--output", str(tmp_path / "bug")])


# ---------------------------------------------------------------------------- trainer.generate
def test_generate_codes(trained, tmp_path, monkeypatch, capsys):
    import trainer.generate
    from trainer.generate import main
    ckpt = trained / "checkpoints" / "step_8"
    assert main(["--model", str(ckpt), "--prompt", "w1 w2", "--max_new_tokens", "3"]) == 0
    bad_flag(main, capsys, "--model", str(ckpt), "--prompt", "w1")
    assert main(["--model", str(tmp_path / "nope"), "--prompt", "w1"]) == 2
    assert f"--model {tmp_path / 'nope'}: no config.json" in capsys.readouterr().err
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"q": "w1 w2"}\n{not json}\n')
    assert main(["--model", str(ckpt), "--prompts_file", str(prompts)]) == 2
    assert f"--prompts_file {prompts}: line 2 is not JSON" in capsys.readouterr().err
    prompts.write_text('{"q": "w1 w2"}\n')
    out = tmp_path / "gen.jsonl"
    monkeypatch.setattr(trainer.generate, "write_text_atomic", fail_disk)  # a full disk: the run failed
    assert main(["--model", str(ckpt), "--prompts_file", str(prompts), "--output", str(out),
                 "--max_new_tokens", "2"]) == 1
    assert f"--output {out}: could not write the 1 results" in capsys.readouterr().err
    assert not out.exists()
    monkeypatch.setattr(trainer.generate, "load_model_for_generation", internal_bug)
    with pytest.raises(KeyError, match="an internal bug"):
        main(["--model", str(ckpt), "--prompt", "w1"])


# --------------------------------------------------------------------- trainer.reference_logps
def test_reference_logps_codes(assets, tmp_path, monkeypatch, capsys):
    from preference_testlib import make_pairs, write_pairs

    import trainer.preference
    import trainer.reference_logps
    from trainer.preference import REF_LOGPS_FILE
    from trainer.reference_logps import main
    tok = build_tokenizer(tmp_path / "tok")
    pairs = write_pairs(tmp_path, "pairs", tok, make_pairs(8, seed=3))
    argv = ["--model_path", str(assets["llama"]), "--data_path", str(pairs), "--precision", "fp32"]
    assert main(argv) == 0 and (pairs / REF_LOGPS_FILE).is_file()
    bad_flag(main, capsys, *argv)
    assert main(argv) == 2  # the file exists: refused without --overwrite
    assert f"--data_path {pairs}: {REF_LOGPS_FILE} exists; pass --overwrite" in capsys.readouterr().err
    missing = tmp_path / "no_pairs"
    assert main(["--model_path", str(assets["llama"]), "--data_path", str(missing)]) == 2
    assert f"--data_path {missing}" in capsys.readouterr().err
    monkeypatch.setattr(trainer.preference, "save_reference_file", fail_disk)
    assert main(argv + ["--overwrite"]) == 1
    assert "No space left on device (injected)" in capsys.readouterr().err
    monkeypatch.setattr(trainer.reference_logps, "compute", internal_bug)
    with pytest.raises(KeyError, match="an internal bug"):
        main(argv + ["--overwrite"])
    # ids past the model's embedding (added tokens the model lacks): 2 before any compute
    big = [(np.r_[c[:-1], 60000, 2], r, p) for c, r, p in make_pairs(2, seed=4)]
    beyond = write_pairs(tmp_path, "beyond", tok, big)
    assert main(["--model_path", str(assets["llama"]), "--data_path", str(beyond)]) == 2
    assert f"--data_path {beyond}: largest token id 60000 but" in capsys.readouterr().err
    assert not (beyond / REF_LOGPS_FILE).exists()


# ------------------------------------------------------------------- every rank, under deepspeed
@pytest.mark.slow
def test_deepspeed_launch_exits_2_from_every_rank(assets, tmp_path):
    """Both ranks find the bad --load_ckpt_path and exit 2; the launcher passes 2 on."""
    not_ckpt = tmp_path / "not_a_checkpoint"
    not_ckpt.mkdir()
    cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(REPO / "trainer" / "train.py"),
           *train_argv(assets, tmp_path / "out", "--load_ckpt_path", str(not_ckpt))]
    proc = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    errors = [l for l in out.splitlines() if "trainer: error before step 1" in l]
    assert len(errors) >= 1 and all(str(not_ckpt) in l for l in errors), out[-3000:]

