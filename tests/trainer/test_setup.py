"""Fast checks of everything decided before step 1: flags, DeepSpeed config, schedule, data checks,
checkpoint paths."""

import json
import subprocess
import sys

import pytest

from trainer.args import parse_args, validate_args
from trainer.checkpoint import list_checkpoints, prune_checkpoints, resolve_checkpoint
from trainer.ds_config import auto_values, read_config, resolve_config
from trainer.model import (DataModelMismatch, add_manifest_tokens, add_special_tokens,
                           check_data_fits_model, check_tokenizer_matches)
from trainer.optim import Lion, lr_factor

from trainer_testlib import REPO, free_port, run_env


def test_every_problem_reported_at_once(tmp_path):
    args = parse_args(["--model_path", str(tmp_path / "nope"), "--data_path", str(tmp_path / "nodata"),
                       "--output_path", str(tmp_path / "out"), "--micro_batch_size", "0",
                       "--warmup_ratio", "1.5", "--eval_steps", "5", "--lora_config_path",
                       str(tmp_path / "lora.json")])
    problems = validate_args(args)
    text = "\n".join(problems)
    for needle in ("--model_path", "--data_path", "--micro_batch_size", "--warmup_ratio",
                   "--max_epochs or --max_steps", "--eval_steps needs", "--lora_config_path",
                   "--use_lora"):
        assert needle in text, (needle, text)


@pytest.mark.parametrize("objective,flag,value,needle", [
    ("sft", "--beta", "0.2", "--beta is read by --objective dpo/ipo/simpo/kto, not sft"),
    ("orpo", "--beta", "0.2", "not orpo (ORPO's weight is --orpo_alpha, TRL's beta)"),
    ("dpo", "--simpo_gamma", "1.0", "--simpo_gamma is read by --objective simpo, not dpo"),
    ("simpo", "--orpo_alpha", "0.5", "--orpo_alpha is read by --objective orpo, not simpo"),
])
def test_a_flag_the_objective_does_not_read_is_refused(tmp_path, objective, flag, value, needle):
    """Never silently ignored: e.g. --beta under ORPO (whose weight is --orpo_alpha)."""
    base = ["--model_path", str(tmp_path), "--data_path", str(tmp_path), "--output_path",
            str(tmp_path / "o"), "--max_steps", "1", "--objective", objective]
    assert needle in "\n".join(validate_args(parse_args([*base, flag, value])))
    assert not any(flag in p for p in validate_args(parse_args(base)))  # the default is fine


def test_missing_manifest_is_named(tmp_path, assets):
    (tmp_path / "half").mkdir()
    args = parse_args(["--model_path", str(assets["llama"]), "--data_path", str(tmp_path / "half"),
                       "--output_path", str(tmp_path), "--max_steps", "1"])
    [problem] = validate_args(args)
    assert "no manifest.json" in problem and "half" in problem


def test_wrong_flags_exit_before_any_training(tmp_path):
    cmd = [sys.executable, str(REPO / "trainer" / "train.py"), "--model_path", str(tmp_path),
           "--data_path", str(tmp_path), "--output_path", str(tmp_path / "out"),
           "--gradient_accumulation_steps", "0"]
    proc = subprocess.run(cmd, env=run_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--gradient_accumulation_steps must be >= 1" in proc.stderr
    assert "no config.json" in proc.stderr and "--max_epochs or --max_steps" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_deepspeed_config_autos_filled():
    args = parse_args(["--model_path", "m", "--data_path", "d", "--output_path", "o", "--max_steps",
                       "1", "--micro_batch_size", "3", "--gradient_accumulation_steps", "4",
                       "--max_grad_norm", "0.5", "--zero_stage", "3"])
    raw, path = read_config(args)
    cfg = resolve_config(raw, path, auto_values(args, world_size=2, precision="bf16", hidden_size=64))
    assert cfg["train_batch_size"] == 24 and cfg["train_micro_batch_size_per_gpu"] == 3
    assert cfg["gradient_accumulation_steps"] == 4 and cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False
    assert cfg["zero_optimization"]["stage"] == 3
    assert "auto" not in json.dumps(cfg)


def test_deepspeed_config_conflicts_rejected():
    args = parse_args(["--model_path", "m", "--data_path", "d", "--output_path", "o", "--max_steps", "1"])
    raw = {"train_micro_batch_size_per_gpu": 8, "optimizer": {"type": "Adam"}, "foo": "auto"}
    with pytest.raises(ValueError) as e:
        resolve_config(raw, "x.json", auto_values(args, world_size=1, precision="fp32", hidden_size=8))
    msg = str(e.value)
    assert "train_micro_batch_size_per_gpu" in msg and '"foo"' in msg
    assert "optimizer" not in msg  # sections are honoured (tests/trainer/test_user_setup.py)


def test_deepspeed_sections_report_our_errors_and_keep_a_bugs_traceback(tmp_path, monkeypatch):
    """validate_args reports a ConfigError and a non-numeric optimizer value as problems (exit 2
    before anything loads); a plain ValueError from inside the planner is a bug: it propagates."""
    import trainer.ds_config
    from trainer.args import _deepspeed_section_problems
    args = parse_args(["--model_path", "m", "--data_path", "d", "--output_path", "o", "--max_steps", "1"])
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({"optimizer": {"type": "Adam", "params": {"lr": "abc", "betas": [0.9]}},
                               "scheduler": {"type": "NoSuchLR"}}))
    problems = _deepspeed_section_problems(args, cfg)
    assert problems == [f"--deepspeed_config_path {cfg}: optimizer.params.lr is 'abc'; use a number "
                        f"or \"auto\" (filled from the flag)",
                        f"--deepspeed_config_path {cfg}: optimizer.params.betas is [0.9]; use two "
                        f"numbers, e.g. [0.9, 0.999], or \"auto\""], problems
    cfg.write_text(json.dumps({"optimizer": {"type": "Adam"}, "scheduler": {"type": "NoSuchLR"}}))
    [problem] = _deepspeed_section_problems(args, cfg)
    assert 'scheduler.type "NoSuchLR" is not supported' in problem

    def bug(*_a, **_k):
        raise ValueError("an internal bug (injected)")
    monkeypatch.setattr(trainer.ds_config, "plan_scheduler", bug)
    with pytest.raises(ValueError, match="internal bug"):
        _deepspeed_section_problems(args, cfg)


def test_lr_schedule_shapes():
    f = lambda k, s: lr_factor(s, kind=k, warmup_steps=10, total_steps=110)
    assert f("cosine", 0) == pytest.approx(0.1) and f("cosine", 9) == pytest.approx(1.0)
    assert f("cosine", 60) == pytest.approx(0.5) and f("cosine", 110) == pytest.approx(0.0)
    assert f("linear", 60) == pytest.approx(0.5) and f("constant", 100) == 1.0


def test_lion_moves_against_gradient_sign():
    import torch
    p = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    opt = Lion([p], lr=0.1)
    p.grad = torch.tensor([3.0, -0.001])
    opt.step()
    assert p.detach().tolist() == pytest.approx([0.9, -0.9])


def test_token_id_beyond_embedding_rejected():
    with pytest.raises(DataModelMismatch, match="largest token id 130 but the model has 124 embedding rows"):
        check_data_fits_model(max_token_id=130, max_length=10, embedding_rows=124, max_positions=128,
                              flag="--data_path")
    with pytest.raises(DataModelMismatch, match="128 positions"):
        check_data_fits_model(max_token_id=3, max_length=200, embedding_rows=124, max_positions=128,
                              flag="--data_path")


def test_tokenizer_hash_mismatch_errors_unless_overridden(assets):
    tok = assets["tokenizer"]
    manifests = [{"tokenizer": {"vocab_hash": "deadbeef", "path": "other", "len": 5}}]
    with pytest.raises(DataModelMismatch, match="--ignore_tokenizer_mismatch"):
        check_tokenizer_matches(tok, manifests, ["d"], set(), ignore=False)
    check_tokenizer_matches(tok, manifests, ["d"], set(), ignore=True)  # warns only


def test_added_tokens_keep_existing_and_must_match_manifest(assets):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(assets["llama"]))
    n = len(tok)
    new = add_manifest_tokens(tok, {"<m>": n}) + add_special_tokens(tok, ["<x>", "<y>"])
    assert new == [n, n + 1, n + 2] and tok.convert_tokens_to_ids("<pad>") == 3
    assert tok.convert_tokens_to_ids("<x>") == n + 1
    assert tok.tokenize("w1 <x>w2") == ["w1", "<x>", "w2"]
    tok2 = AutoTokenizer.from_pretrained(str(assets["llama"]))
    with pytest.raises(DataModelMismatch, match="'<m>': data id 500"):
        add_manifest_tokens(tok2, {"<m>": 500})


def test_checkpoint_resolution_and_pruning(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    for n in (2, 4, 10):
        (root / f"step_{n}").mkdir(parents=True)
        (root / f"step_{n}" / "trainer_state.json").write_text("{}")
    (root / "latest").write_text("step_10\n")
    assert resolve_checkpoint(tmp_path / "run") == root / "step_10"
    assert resolve_checkpoint(root / "step_4") == root / "step_4"
    with pytest.raises(FileNotFoundError, match="--load_ckpt_path"):
        resolve_checkpoint(tmp_path)
    prune_checkpoints(root, 2)
    assert [p.name for p in list_checkpoints(root)] == ["step_4", "step_10"]


RANK_INIT = """
import os, deepspeed.comm.comm as ds_comm
from trainer.dist import init_distributed, barrier
init_distributed()
barrier()
print("shm op:", ds_comm.cdb.shm_comm_op)
print("shm files:", sorted(f for f in os.listdir("/dev/shm") if f.endswith("_" + os.environ["MASTER_PORT"] + "_" + os.environ["RANK"])))
"""


def test_two_cpu_ranks_leave_nothing_in_dev_shm():
    """DeepSpeed's CPU shared-memory all-reduce op creates a 66 MB /dev/shm file per rank that it
    never unlinks (132 MB of RAM leaked per 2-rank run); trainer.dist keeps the op out. The ranks
    get the variables the deepspeed launcher sets, LOCAL_SIZE included (the op's trigger)."""
    port = str(free_port())
    env = {**run_env(), "WORLD_SIZE": "2", "LOCAL_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": port}
    ranks = [subprocess.Popen([sys.executable, "-c", RANK_INIT], cwd=REPO, text=True,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in (0, 1)]
    outs = [p.communicate(timeout=240)[0] for p in ranks]
    for p, out in zip(ranks, outs):
        assert p.returncode == 0, out
        assert "shm op: None" in out and "shm files: []" in out, out
    from pathlib import Path
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
