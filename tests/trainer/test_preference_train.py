"""`--objective dpo` end to end on CPU (fp32): the step losses of one run are reproduced by
gradient accumulation (4x1 == micro 4), packing (2 pairs a sample), precomputed reference
log-probs, ZeRO-3 (reference model partitioned too), 2 data-parallel ranks and a resume; LoRA uses the adapter-disabled policy as
reference; bad combinations are refused up front. Every run starts at loss ln 2 exactly (policy ==
reference). Step losses are means over the global batch's pairs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from preference_testlib import make_pairs, write_pairs
from trainer_testlib import (REPO, build_model, build_tokenizer, check_ok, run_env, run_train,
                             run_trains)

STEPS = 4
TOL = 2e-6
COMMON = ["--objective", "dpo", "--beta", "0.5", "--max_steps", str(STEPS), "--learning_rate",
          "3e-3", "--lr_scheduler", "linear", "--logging_steps", "1", "--seed", "5",
          "--precision", "fp32", "--num_workers", "0", "--no-shuffle_data", "--no_timestamp"]


@pytest.fixture(scope="module")
def pref_assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("pref")
    tok = build_tokenizer(root / "model")
    build_model(root / "model", vocab_size=len(tok))
    pairs = make_pairs(64, seed=11)
    return {"root": root, "model": root / "model",
            "pairs": write_pairs(root / "data", "pairs", tok, pairs),
            "packed": write_pairs(root / "data", "packed", tok, pairs, per_sample=2),
            "eval": write_pairs(root / "data", "eval", tok, make_pairs(12, seed=12))}


def _args(a: dict, out: Path, name: str, *extra: str, data: str = "pairs") -> list[str]:
    return ["--model_path", str(a["model"]), "--data_path", str(a[data]), "--output_path",
            str(out), "--save_name", name, *COMMON, *extra]


def _orpo_args(*args, **kwargs) -> list[str]:
    """_args for --objective orpo: without COMMON's --beta (ORPO's weight is --orpo_alpha; a
    --beta it would not read is refused)."""
    argv = _args(*args, "--objective", "orpo", "--orpo_alpha", "0.2", **kwargs)
    k = argv.index("--beta")
    return argv[:k] + argv[k + 2:]


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def _train_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in _log(run_dir) if "eval_loss" not in r]


@pytest.fixture(scope="module")
def baseline(pref_assets, tmp_path_factory) -> dict:
    """Micro-batch 4 (with eval and a mid-way save for the resume test) and accumulation 4 x 1,
    side by side."""
    out = tmp_path_factory.mktemp("pref_runs")
    a = pref_assets
    procs = run_trains(timeout=900, arg_lists=[
        _args(a, out, "micro4", "--micro_batch_size", "4", "--eval_data_path", str(a["eval"]),
              "--save_steps", "2", "--save_optimizer", "--report_to", "tensorboard"),
        _args(a, out, "accum4", "--micro_batch_size", "1", "--gradient_accumulation_steps", "4",
              "--eval_data_path", str(a["eval"]), "--eval_max_samples", "5"),
    ])
    for p in procs:
        check_ok(p)
    return {"out": out, "micro4": out / "micro4", "accum4": out / "accum4"}


def test_metrics_logged_and_first_step_is_ln2(baseline):
    log = _log(baseline["micro4"])
    train = [r for r in log if "eval_loss" not in r]
    assert len(train) == STEPS and abs(train[0]["loss"] - math.log(2)) < 1e-6
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                "rewards/margins", "logps/chosen", "logps/rejected"):
        assert all(key in r for r in train), key
    (ev,) = [r for r in log if "eval_loss" in r]
    assert ev["eval_pairs"] == 12 and 0 <= ev["eval_rewards/accuracies"] <= 1
    assert train[-1]["rewards/margins"] > 0        # it learns the preference
    assert (baseline["micro4"] / "preference_curves.png").stat().st_size > 1000
    assert list((baseline["micro4"] / "tensorboard").glob("events.*"))
    resolved = json.loads((baseline["micro4"] / "checkpoints" / f"step_{STEPS}" /
                           "resolved_config.json").read_text())
    assert resolved["objective"] == "dpo" and resolved["reference"].startswith("model ")


def test_accumulation_equals_micro_batch(baseline):
    """Loss and every preference metric of every step; the capped eval takes the first 5 pairs."""
    a, b = _train_losses(baseline["micro4"]), _train_losses(baseline["accum4"])
    assert max(abs(x - y) for x, y in zip(a, b)) <= TOL, (a, b)
    train = [[r for r in _log(baseline[k]) if "eval_loss" not in r] for k in ("micro4", "accum4")]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected"):
        # logps are sums of ~10-30 token log-probs (|x| ~ 10-60): compared relative to their size
        assert max(abs(x[key] - y[key]) / max(1.0, abs(x[key])) for x, y in zip(*train)) <= TOL, key
    (ev,) = [r for r in _log(baseline["accum4"]) if "eval_loss" in r]
    assert ev["eval_pairs"] == 5        # --eval_max_samples 5 of the 12 eval pairs


def test_packed_precomputed_and_zero3_equal_the_baseline(baseline, pref_assets, tmp_path):
    a = pref_assets
    # precompute the reference log-probs beside both datasets (one process, one model)
    cmd = [sys.executable, "-m", "trainer.reference_logps", "--model_path", str(a["model"]),
           "--data_path", str(a["pairs"]), str(a["packed"]), "--precision", "fp32", "--overwrite"]
    check_ok(subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True,
                            timeout=900))
    procs = run_trains(timeout=900, arg_lists=[
        _args(a, tmp_path, "packed", "--micro_batch_size", "2", data="packed"),
        _args(a, tmp_path, "pre", "--micro_batch_size", "4", "--precomputed_ref_logps"),
        _args(a, tmp_path, "z3", "--micro_batch_size", "4", "--zero_stage", "3"),
    ])
    for p in procs:
        check_ok(p)
    base = _train_losses(baseline["micro4"])
    for name in ("packed", "pre", "z3"):
        got = _train_losses(tmp_path / name)
        assert max(abs(x - y) for x, y in zip(base, got)) <= TOL, (name, base, got)
    resolved = json.loads((tmp_path / "pre" / "checkpoints" / f"step_{STEPS}" /
                           "resolved_config.json").read_text())
    assert resolved["reference"].startswith("precomputed")
    resolved = json.loads((tmp_path / "z3" / "checkpoints" / f"step_{STEPS}" /
                           "resolved_config.json").read_text())
    assert resolved["reference"].startswith("model ") and resolved["zero_stage"] == 3


def test_precomputed_file_refused_for_other_model_or_data(pref_assets, tmp_path):
    """The file beside `pairs` (written by the test above, for this model) is refused for another
    model (by the trainer, before any model loads), beside another dataset, and in a run of
    another precision or attention implementation."""
    import shutil

    from trainer.preference import (REF_LOGPS_FILE, dataset_fingerprint, load_reference_file,
                                    model_fingerprint)
    from shardfmt import open_dataset
    a = pref_assets
    other = tmp_path / "other_model"
    tok = build_tokenizer(other)
    build_model(other, vocab_size=len(tok), seed=3)
    proc = run_train(["--model_path", str(other), "--data_path", str(a["pairs"]), "--output_path",
                      str(tmp_path), "--save_name", "bad", *COMMON, "--precomputed_ref_logps"],
                     check=False, timeout=900)
    assert proc.returncode == 2 and "another reference model" in proc.stderr, proc.stderr[-2000:]
    assert "python -m trainer.reference_logps" in proc.stderr
    data = write_pairs(tmp_path, "copy", tok, make_pairs(64, seed=11)[:32])
    shutil.copy(a["pairs"] / REF_LOGPS_FILE, data / REF_LOGPS_FILE)
    theirs = a["pairs"] / REF_LOGPS_FILE
    with np.load(theirs, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
    same = dict(model_hash=model_fingerprint(a["model"]), ref_model_path=str(a["model"]),
                dtype=torch.float32, attn=meta["attn_implementation"])
    with pytest.raises(ValueError, match="computed for another dataset"):
        load_reference_file(data / REF_LOGPS_FILE, num_pairs=32, **same,
                            dataset_hash=dataset_fingerprint(open_dataset(data).manifest))
    # the same file and dataset, trained in another precision / attention: refused, naming the flag
    mine = dict(same, num_pairs=meta["pairs"],
                dataset_hash=dataset_fingerprint(open_dataset(a["pairs"]).manifest))
    assert meta["precision"] == "float32" and load_reference_file(theirs, **mine).shape[1] == 2
    with pytest.raises(ValueError, match=r"computed in float32, this run trains in bfloat16; "
                                         r".* --overwrite --precision bf16$"):
        load_reference_file(theirs, **dict(mine, dtype=torch.bfloat16))
    other_attn = "eager" if meta["attn_implementation"] != "eager" else "sdpa"
    with pytest.raises(ValueError, match=f"this run uses {other_attn}; .* --attn_implementation "
                                         f"{other_attn}$"):
        load_reference_file(theirs, **dict(mine, attn=other_attn))


def test_lora_reference_is_the_adapter_free_policy(pref_assets, tmp_path):
    proc = run_train(_args(pref_assets, tmp_path, "lora", "--micro_batch_size", "4", "--use_lora",
                           "--learning_rate", "1e-2"), timeout=900)
    losses = _train_losses(tmp_path / "lora")
    assert abs(losses[0] - math.log(2)) < 1e-6 and losses[-1] < losses[0]
    resolved = json.loads((tmp_path / "lora" / "checkpoints" / f"step_{STEPS}" /
                           "resolved_config.json").read_text())
    assert resolved["reference"] == "policy with LoRA adapters disabled"
    assert "trainable params" in proc.stdout + proc.stderr


def test_bad_combinations_refused(pref_assets, tmp_path):
    a = pref_assets
    procs = run_trains(timeout=900, arg_lists=[
        ["--model_path", str(a["model"]), "--data_path", str(a["pairs"]), "--output_path",
         str(tmp_path), "--max_steps", "1"],                                 # sft on pairs
        _args(a, tmp_path, "x", "--label_smoothing", "0.7", "--objective", "orpo",
              "--ref_model_path", str(tmp_path / "nope")),
    ])
    assert procs[0].returncode == 2 and "preference (pair) dataset" in procs[0].stderr
    err = procs[1].stderr
    assert procs[1].returncode == 2 and "--label_smoothing must be in [0, 0.5)" in err
    assert "uses no reference model" in err and "no config.json" in err
    assert "--beta is read by --objective dpo/ipo/simpo/kto, not orpo" in err  # COMMON's --beta


@pytest.mark.slow
def test_two_ranks_and_resume_equal_one_process(baseline, pref_assets, tmp_path):
    a = pref_assets
    run_train(_args(a, tmp_path, "ranks2", "--micro_batch_size", "2", "--zero_stage", "2"),
              launcher="torchrun", nproc=2, timeout=900)
    run_train(_args(a, tmp_path, "resumed", "--micro_batch_size", "4", "--load_ckpt_path",
                    str(baseline["micro4"] / "checkpoints" / "step_2")), timeout=900)
    base = _train_losses(baseline["micro4"])
    got = _train_losses(tmp_path / "ranks2")
    assert max(abs(x - y) for x, y in zip(base, got)) <= TOL, (base, got)
    resumed = _train_losses(tmp_path / "resumed")
    assert len(resumed) == STEPS - 2
    assert max(abs(x - y) for x, y in zip(base[2:], resumed)) <= TOL, (base, resumed)


def _first_loss_is_ln2(run_dir: Path) -> list[float]:
    losses = _train_losses(run_dir)
    assert abs(losses[0] - math.log(2)) < 1e-6, losses  # policy == reference, new rows included
    return losses


@pytest.mark.slow
def test_orpo_mix_and_added_tokens(pref_assets, tmp_path):
    """ORPO's global normalisation (NLL: token mean over the global batch's chosen tokens):
    accumulation 4 x 1 on unpacked pairs == micro-batch 2 of packed samples (2 pairs each).
    --add_tokens: the reference (the starting model, or LoRA's adapter-free policy) gets the same
    new rows as the policy, so the first DPO step is ln 2 exactly; a weighted mix of two pair
    datasets trains, with per-source loss and pairs in the log. Refused with a clear message:
    a pair + non-pair mix, --add_tokens with a --ref_model_path lacking the rows, and with
    --precomputed_ref_logps."""
    from trainer_testlib import write_dataset
    a = pref_assets
    other = tmp_path / "other_model"
    tok = build_tokenizer(other)
    build_model(other, vocab_size=len(tok), seed=3)
    sft = write_dataset(tmp_path, "sft", tok, num_samples=8)
    mix = ["--data_path", "0.7", str(a["pairs"]), "0.3", str(a["packed"])]
    add = ["--add_tokens", "<tool>,<think>"]
    procs = run_trains(timeout=900, arg_lists=[
        _orpo_args(a, tmp_path, "orpo_accum", "--micro_batch_size", "1",
                   "--gradient_accumulation_steps", "4"),
        _orpo_args(a, tmp_path, "orpo_packed", "--micro_batch_size", "2", data="packed"),
        _args(a, tmp_path, "mix_added", "--micro_batch_size", "4", *add, *mix),
        _args(a, tmp_path, "lora_added", "--micro_batch_size", "4", "--use_lora", *add),
        _args(a, tmp_path, "bad_mix", "--data_path", str(a["pairs"]), str(sft)),
        _args(a, tmp_path, "bad_ref", *add, "--ref_model_path", str(other)),
        _args(a, tmp_path, "bad_pre", *add, "--precomputed_ref_logps"),
    ])
    for p in procs[:4]:
        check_ok(p)
    x, y = _train_losses(tmp_path / "orpo_accum"), _train_losses(tmp_path / "orpo_packed")
    assert max(abs(u - v) for u, v in zip(x, y)) <= TOL, (x, y)
    assert x[-1] < x[0]
    _first_loss_is_ln2(tmp_path / "mix_added")
    _first_loss_is_ln2(tmp_path / "lora_added")
    last = [r for r in _log(tmp_path / "mix_added") if "eval_loss" not in r][-1]
    # 4 samples a step: an unpacked one holds 1 pair, a packed one 2
    assert last["pairs/pairs"] + last["pairs/packed"] == last["pairs_per_step"]
    assert last["pairs/packed"] % 2 == 0 and last["pairs/pairs"] + last["pairs/packed"] / 2 == 4
    assert last["loss/pairs"] is not None
    for p, words in zip(procs[4:], (["needs preference pairs in every source", str(sft)],
                                    ["--ref_model_path", "could not start as the policy's"],
                                    ["--precomputed_ref_logps", "without the new rows"])):
        assert p.returncode == 2, p.stderr[-2000:]
        for w in words:
            assert w in p.stderr, (w, p.stderr[-2000:])
