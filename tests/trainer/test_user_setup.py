"""Fast checks of the user-facing set-up (issue 16): DeepSpeed optimizer/scheduler sections mapped
and "auto"-filled exactly as the Hugging Face Trainer fills them, --config files, help texts,
trackers with the real packages, one line per warning kind, durable checkpoint metadata.
The end-to-end DeepSpeed runs of these configs are in test_ds_configs.py."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.args import BUNDLED_CONFIG_DIR, build_parser, deepspeed_config_file, parse_args
from trainer.ds_config import (build_optimizer_and_scheduler, optimizer_offloaded, plan_optimizer,
                               plan_scheduler, read_config)

from trainer_testlib import REPO, run_env

DS_CONFIGS = Path(__file__).resolve().parent / "ds_configs"
HF_ZERO2 = DS_CONFIGS / "hf_ds_config_zero2.json"
LF_Z3_OFFLOAD = DS_CONFIGS / "llamafactory_ds_z3_offload_config.json"
BASE = ["--model_path", "m", "--data_path", "d", "--output_path", "o"]


# ---------------------------------------------------------------------------- DeepSpeed sections
def hf_filled(config: dict, *, lr: float, betas: tuple, eps: float, wd: float, warmup: int,
              steps: int) -> dict:
    """The config as transformers' own DeepSpeed integration fills its "auto" values."""
    import torch
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig
    ta = TrainingArguments(output_dir="/tmp/unused", learning_rate=lr, adam_beta1=betas[0],
                           adam_beta2=betas[1], adam_epsilon=eps, weight_decay=wd,
                           warmup_steps=warmup, max_steps=steps, use_cpu=True, report_to=[])
    hf = HfTrainerDeepSpeedConfig(json.loads(json.dumps(config)))
    hf.trainer_config_process(ta)
    model = torch.nn.Linear(2, 2)
    model.config = argparse.Namespace(hidden_size=64)
    hf.trainer_config_finalize(ta, model, steps)
    return hf.config


@pytest.mark.parametrize("scheduler", ["WarmupLR", "WarmupDecayLR", "WarmupCosineLR"])
def test_auto_values_match_the_hf_trainer(scheduler):
    """HF's ds_config_zero2.json verbatim (and with its scheduler type swapped): our plan's values
    are the ones transformers' HfTrainerDeepSpeedConfig writes for the same hyper-parameters."""
    raw = json.loads(HF_ZERO2.read_text())
    raw["scheduler"]["type"] = scheduler
    if scheduler != "WarmupLR":
        raw["scheduler"]["params"]["total_num_steps"] = "auto"
    if scheduler == "WarmupCosineLR":  # its parameters are ratios, not LRs
        del raw["scheduler"]["params"]["warmup_min_lr"], raw["scheduler"]["params"]["warmup_max_lr"]
    args = parse_args(BASE + ["--max_steps", "16", "--learning_rate", "3e-3", "--adam_beta2",
                              "0.98", "--adam_epsilon", "1e-6", "--weight_decay", "0.1",
                              "--warmup_ratio", "0.125"])
    opt = plan_optimizer(raw, str(HF_ZERO2), args, cpu_offload=True)
    sched = plan_scheduler(raw, str(HF_ZERO2), args, total_steps=16, lr=opt.lr)
    ref = hf_filled(raw, lr=3e-3, betas=(0.9, 0.98), eps=1e-6, wd=0.1, warmup=2, steps=16)
    p = ref["optimizer"]["params"]
    assert (opt.name, opt.lr, opt.betas, opt.eps, opt.weight_decay) == (
        "adamw", p["lr"], tuple(p["betas"]), p["eps"], p["weight_decay"])
    assert sched.kind == scheduler and sched.params == pytest.approx(ref["scheduler"]["params"])


def test_deepspeed_schedule_is_deepspeeds_own_and_resumes():
    """The built schedule is DeepSpeed's class: its LRs are DeepSpeed's, step by step, and
    set_schedule_position(k) (resume without engine state) lands where k steps land."""
    import torch
    from deepspeed.runtime.lr_schedules import WarmupDecayLR

    from trainer.ds_config import set_schedule_position
    raw = {"optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
           "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": "auto",
                                                            "total_num_steps": "auto",
                                                            "warmup_type": "linear"}}}
    args = parse_args(BASE + ["--max_steps", "10", "--learning_rate", "1e-2", "--warmup_ratio", "0.3"])
    model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    opt = plan_optimizer(raw, "x.json", args, cpu_offload=False)
    sched = plan_scheduler(raw, "x.json", args, total_steps=10, lr=opt.lr)
    optimizer, scheduler = build_optimizer_and_scheduler(model, opt, sched)
    assert isinstance(optimizer, torch.optim.AdamW) and isinstance(scheduler, WarmupDecayLR)
    ref_opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref = WarmupDecayLR(ref_opt, total_num_steps=10, warmup_max_lr=1e-2, warmup_num_steps=3,
                        warmup_type="linear")
    ours = []
    for _ in range(10):
        ours.append(optimizer.param_groups[0]["lr"])
        scheduler.step()
    theirs = []
    for _ in range(10):
        theirs.append(ref_opt.param_groups[0]["lr"])
        ref.step()
    assert ours == theirs
    _, fresh = build_optimizer_and_scheduler(model, opt, sched)
    set_schedule_position(fresh, 6)
    assert fresh.optimizer.param_groups[0]["lr"] == ours[6]


def test_lion_adam_l2_and_offload_mapping():
    args = parse_args(BASE + ["--max_steps", "4"])
    lion = plan_optimizer({"optimizer": {"type": "lion", "params": {"lr": 1e-4, "betas": "auto"}}},
                          "x.json", args, cpu_offload=False)
    assert (lion.name, lion.lr, lion.betas) == ("lion", 1e-4, (0.9, 0.99))
    adam_l2 = plan_optimizer({"optimizer": {"type": "Adam", "params": {"adam_w_mode": False}}},
                             "x.json", args, cpu_offload=False)
    assert adam_l2.name == "adam"
    # DeepSpeed's "Adam" is AdamW unless adam_w_mode is false
    assert plan_optimizer({"optimizer": {"type": "Adam"}}, "x.json", args,
                          cpu_offload=False).name == "adamw"
    for cfg in (json.loads(HF_ZERO2.read_text()), json.loads(LF_Z3_OFFLOAD.read_text()),
                json.loads((BUNDLED_CONFIG_DIR / "zero3_offload.json").read_text())):
        assert optimizer_offloaded(cfg)
    assert not optimizer_offloaded(json.loads((BUNDLED_CONFIG_DIR / "zero3.json").read_text()))
    # no section: the flags, DeepSpeed's CPU optimizer when offloaded
    plan = plan_optimizer({}, "x.json", args, cpu_offload=True)
    assert "DeepSpeedCPUAdam" in plan.describe() and plan.source == "--optimizer"


def test_unsupported_and_contradicting_sections_are_one_concise_message():
    args = parse_args(BASE + ["--max_steps", "4"])
    with pytest.raises(ValueError) as e:
        plan_optimizer({"optimizer": {"type": "OneBitAdam", "params": {}}}, "ds.json", args,
                       cpu_offload=False)
    msg = str(e.value)
    assert msg.count("\n") == 0 and "OneBitAdam" in msg and "Adam, AdamW, Lion" in msg
    assert "--optimizer" in msg
    with pytest.raises(ValueError, match=r'scheduler.type "OneCycle".*WarmupLR'):
        plan_scheduler({"scheduler": {"type": "OneCycle"}}, "ds.json", args, total_steps=4, lr=1e-3)
    changed = parse_args(BASE + ["--max_steps", "4", "--learning_rate", "1e-3", "--lr_scheduler",
                                 "linear"])
    with pytest.raises(ValueError) as e:
        plan_optimizer({"optimizer": {"type": "AdamW", "params": {"lr": 5e-4, "foo": 1}}}, "ds.json",
                       changed, cpu_offload=False)
    assert "optimizer.params.lr: 0.0005 contradicts --learning_rate 0.001" in str(e.value)
    assert "optimizer.params.foo" in str(e.value)
    with pytest.raises(ValueError, match="contradicts --lr_scheduler linear"):
        plan_scheduler({"scheduler": {"type": "WarmupLR"}}, "ds.json", changed, total_steps=4,
                       lr=1e-3)
    # a number in the file with the flag left at its default: the file's number is used
    kept = plan_optimizer({"optimizer": {"type": "AdamW", "params": {"lr": 5e-4}}}, "ds.json", args,
                          cpu_offload=False)
    assert kept.lr == 5e-4


def test_unsupported_section_reported_with_the_other_flag_problems(tmp_path):
    """Checked by validate_args, before any model or DeepSpeed loads."""
    from trainer.args import validate_args
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({"optimizer": {"type": "Lamb", "params": {"lr": "auto"}}}))
    problems = validate_args(parse_args(BASE + ["--max_steps", "4", "--deepspeed_config_path",
                                                str(cfg), "--micro_batch_size", "0"]))
    assert any('optimizer.type "Lamb" is not supported' in p for p in problems), problems
    assert any("--micro_batch_size" in p for p in problems)


def test_bundled_configs_by_name():
    for name in ("zero2", "zero3", "zero3_offload"):
        assert deepspeed_config_file(name) == BUNDLED_CONFIG_DIR / f"{name}.json"
        args = parse_args(BASE + ["--max_steps", "1", "--deepspeed_config_path", name])
        raw, path = read_config(args)
        assert Path(path).name == f"{name}.json" and "zero_optimization" in raw


# ---------------------------------------------------------------------------- --config, help
def test_config_file_keys_are_flags_and_command_line_wins(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model_path: m\ndata_path: [a, b]\noutput_path: o\nmax_steps: 50\n"
                   "learning_rate: 3.0e-4\nshuffle_data: false\nreport_to: [tensorboard, mlflow]\n"
                   "use_lora: true\nadd_tokens: ['<x>']\n")
    args = parse_args(["--config", str(cfg), "--learning_rate", "1e-3", "--data_path", "c"])
    assert args.model_path == "m" and args.max_steps == 50 and args.shuffle_data is False
    assert args.learning_rate == 1e-3 and args.data_path == ["c"]  # overridden, not extended
    assert args.report_to == ["tensorboard", "mlflow"] and args.use_lora and args.add_tokens == ["<x>"]
    assert args.config == str(cfg)
    # a command-line flag overrides the file's mutually exclusive partner too
    assert parse_args(["--config", str(cfg), "--max_epochs", "2"]).max_steps is None


def test_report_to_any_subset():
    from trainer.args import validate_args
    assert parse_args(BASE + ["--max_steps", "1", "--report_to", "none"]).report_to == []
    assert parse_args(BASE + ["--max_steps", "1", "--report_to", "wandb", "mlflow"]).report_to == [
        "wandb", "mlflow"]
    problems = validate_args(parse_args(BASE + ["--max_steps", "1", "--report_to", "comet"]))
    assert any("--report_to comet: unknown tracker" in p for p in problems)


def test_config_file_unknown_key_refused_naming_it(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model_path: m\nlerning_rate: 1\n")
    proc = subprocess.run([sys.executable, str(REPO / "trainer" / "train.py"), "--config", str(cfg)],
                          env=run_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "'lerning_rate'" in proc.stderr and "did you mean 'learning_rate'" in proc.stderr
    assert str(cfg) in proc.stderr
    cfg.write_text("- a\n- b\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(cfg)])
    cfg.write_text("max_steps: many\n")
    with pytest.raises(SystemExit):
        parse_args(BASE + ["--config", str(cfg)])


def test_encoder_config_file(tmp_path, capsys):
    """The encoder takes the same --config files (its own flag names)."""
    from encoder.main import main
    cfg = tmp_path / "enc.yaml"
    cfg.write_text("tokenizer_path: nowhere\nencode_type: pretrain\nmax_length: 16\nmax_lenght: 3\n")
    with pytest.raises(SystemExit) as e:
        main(["--config", str(cfg)])
    assert e.value.code == 2 and "'max_lenght'" in capsys.readouterr().err


def test_every_trainer_flag_has_help_with_its_default():
    parser = build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or action.dest == "help":
            continue
        text = formatter._get_help_string(action) % {"default": action.default}
        assert action.help and ("(default:" in text or "(required)" in text), action.dest
    readme = (REPO / "README.md").read_text() + (REPO / "trainer" / "README.md").read_text()
    assert "shuffle" in readme and "--no-shuffle_data" in readme


# ---------------------------------------------------------------------------- trackers
def test_trackers_get_the_jsonl_metrics_with_the_real_packages(tmp_path, monkeypatch):
    """TensorBoard, wandb (offline) and MLflow (its local SQLite store) receive the same numbers
    as train_log.jsonl, under the run name, with the resolved config."""
    from trainer.metrics import Reporter
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = {"args": {"learning_rate": 0.003, "save_name": "myrun"}, "deepspeed_config": {"a": 1}}
    rep = Reporter(tmp_path, enabled=True, total_steps=3, initial_step=0,
                   trackers=["tensorboard", "wandb", "mlflow"], run_name="myrun", config=config)
    losses = [2.345678, 1.987654, 1.5]
    for step, loss in enumerate(losses, 1):
        rep.log({"step": step, "loss": loss, "lr": 1e-3, "grad_norm": None})
    rep.log({"step": 3, "eval_loss": 1.25, "eval_ppl": 3.49})
    rep.close()
    jsonl = [json.loads(l) for l in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in jsonl if "loss" in r] == losses

    import mlflow
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("llm-shards").experiment_id])[0]
    assert run.info.run_name == "myrun" and run.data.params["learning_rate"] == "0.003"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == list(enumerate(losses, 1))
    assert client.get_metric_history(run.info.run_id, "eval/eval_loss")[0].value == 1.25
    saved = list((tmp_path / "mlflow_artifacts").rglob("resolved_config.json"))
    assert len(saved) == 1 and json.loads(saved[0].read_text()) == config
    assert not (Path.cwd() / "mlruns").exists()  # nothing outside the run dir

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx(losses)

    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    blob = runs[0].read_bytes()  # wandb's offline transaction log (what `wandb sync` uploads)
    for needle in (b"myrun", b"train/loss", b"eval/eval_loss", b"learning_rate",
                   *(json.dumps(l).encode() for l in losses)):
        assert needle in blob, needle


def test_report_write_failures_name_the_file_and_the_fix(tmp_path):
    """trainer/metrics.py: each kind of failed write gets its own fix; a failed close is raised
    unless another error is already on its way (quiet)."""
    import errno

    from trainer.errors import ReportWriteError
    from trainer.metrics import Reporter, write_failure
    log = tmp_path / "run" / "train_log.jsonl"
    cases = {errno.ENOSPC: "No space left on device [ENOSPC]; free space on its disk",
             errno.EACCES: f"Permission denied [EACCES]; make {log.parent} writable for this user",
             errno.ENOENT: f"No such file or directory [ENOENT]; {log.parent} was removed or "
                           f"replaced while the run ran: restore it",
             errno.EIO: "Input/output error [EIO]; check that disk (an I/O error)"}
    for code, text in cases.items():
        e = write_failure(log, OSError(code, os.strerror(code)))
        assert isinstance(e, ReportWriteError) and str(e).startswith(f"writing {log} failed: {text}")
    rep = Reporter(tmp_path, enabled=True, total_steps=1, initial_step=0)
    rep.log({"step": 1, "loss": 1.0})
    os.close(rep.fd)  # the next close fails (EBADF), as a flush to a dead disk would
    with pytest.raises(ReportWriteError, match=r"train_log.jsonl failed: Bad file descriptor"):
        rep.close()
    rep = Reporter(tmp_path, enabled=True, total_steps=1, initial_step=0)
    os.close(rep.fd)
    rep.close(quiet=True)  # nothing raised: the error already on its way is the one reported
    assert (tmp_path / "train_log.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'


# ---------------------------------------------------------------------------- console, durability
def test_one_line_per_warning_kind_and_known_noise_silenced():
    code = """
import logging, warnings, sys
from trainer import console
console.install(is_main=True)
logging.basicConfig(level=logging.INFO)
ds = logging.getLogger("DeepSpeed")
for _ in range(3):
    ds.warning("Setting accelerator to CPU. If you have GPU or other accelerator, ...")
    ds.warning("Attempting to get learning rate from scheduler before it has started")
    ds.warning("real problem %d", 7)
    logging.getLogger("trainer").warning("disk almost full")
    warnings.warn("your data has a real issue", UserWarning)
    warnings.warn("TypedStorage is deprecated. It will be removed", UserWarning)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=run_env(),
                          capture_output=True, text=True, timeout=120)
    err = proc.stderr
    assert proc.returncode == 0, err
    assert "Setting accelerator" not in err and "Attempting to get learning rate" not in err
    assert "TypedStorage" not in err
    assert err.count("real problem 7") == 1 and err.count("disk almost full") == 1
    lines = [l for l in err.splitlines() if "your data has a real issue" in l]
    assert len(lines) == 1 and lines[0].startswith("UserWarning: your data has a real issue (")


def test_checkpoint_metadata_is_written_durably(tmp_path, monkeypatch):
    """trainer_state.json/latest go through shardfmt's one durable writer: file fsync, rename,
    directory fsync; nothing half-written is left if the write fails."""
    import os

    import shardfmt.writer as writer
    from trainer import checkpoint
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(writer.os, "fsync", lambda fd: (synced.append(os.readlink(
        f"/proc/self/fd/{fd}")), real_fsync(fd))[1])
    checkpoint._write_json(tmp_path / "trainer_state.json", {"step": 3, "p": tmp_path})
    assert json.loads((tmp_path / "trainer_state.json").read_text()) == {"step": 3, "p": str(tmp_path)}
    # a temp name of its own (pid + random: two writers of one path never share a temp file)
    [tmp_name, directory] = synced
    assert tmp_name.startswith(str(tmp_path / f"trainer_state.json.{os.getpid()}.")) and \
        tmp_name.endswith(".tmp") and directory == str(tmp_path), synced
    assert checkpoint.write_text_atomic is writer.write_text_atomic
    monkeypatch.setattr(writer.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "full")))
    with pytest.raises(OSError):
        checkpoint._write_json(tmp_path / "trainer_state.json", {"step": 4})
    assert json.loads((tmp_path / "trainer_state.json").read_text())["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trainer_state.json"]
