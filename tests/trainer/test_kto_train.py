"""`--objective kto` end to end on CPU (fp32) on LLaMA-Factory's kto_en_demo.json, encoded through
the bundled plugin (llama2 tokenizer and template, --max_length 128, --truncation right) for a tiny
llama with llama2's vocabulary: the first step is exactly 0.5 (policy == reference: every reward
and z0 are 0, each loss w (1 - sigmoid(0))), TRL's KTO metrics reach the JSONL / TensorBoard /
curves PNG, accumulation 4 x 1 == micro-batch 4 (the KL pairs span the rank's whole step),
resume reproduces the uninterrupted run, LoRA's reference is the adapter-free policy, and bad
combinations exit 2. (Equality with TRL's KTOTrainer: tests/trainer/test_preference_trl.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer_testlib import run_chains

STEPS = 4
# fp32: a completion's summed log-prob here is ~ -1000 (up to 127 tokens, 32000-way softmax), so
# its rounding alone is ~1e-4 and reaches the loss through beta * sigmoid' as a few 1e-6; two Adam
# steps later, different batch shapes (1 vs 4 examples a forward) differ by up to ~5e-6
TOL = 2e-5
COMMON = ["--objective", "kto", "--beta", "0.5", "--max_steps", str(STEPS), "--learning_rate",
          "3e-3", "--lr_scheduler", "linear", "--logging_steps", "1", "--seed", "5",
          "--precision", "fp32", "--num_workers", "0", "--no-shuffle_data", "--no_timestamp"]


@pytest.fixture(scope="module")
def kto_assets(shared_dir, tmp_path_factory) -> dict:
    from transformers import AutoTokenizer

    from encoder.main import main as encode_main
    from family_testlib import build_family_model
    root = tmp_path_factory.mktemp("kto")
    tok_dir = shared_dir / "tokenizers" / "llama2"
    assert encode_main(["--tokenizer_path", str(tok_dir), "--encode_type", "kto", "--template",
                        "llama2", "--data_loader_path",
                        str(Path(__file__).resolve().parents[2] / "encoder" / "user_data_loader"
                            / "kto_messages.py"),
                        "--data_loader_args", f"path={shared_dir / 'data' / 'kto_en_demo.json'}",
                        "--output_path", str(root / "data"), "--corpus_name", "kto_en",
                        "--max_length", "128", "--truncation", "right"]) == 0
    build_family_model(root / "model", "llama")
    AutoTokenizer.from_pretrained(str(tok_dir)).save_pretrained(str(root / "model"))
    return {"root": root, "model": root / "model", "data": root / "data" / "kto_en"}


def _args(a: dict, out: Path, name: str, *extra: str) -> list[str]:
    return ["--model_path", str(a["model"]), "--data_path", str(a["data"]), "--output_path",
            str(out), "--save_name", name, *COMMON, *extra]


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def _train(run_dir: Path) -> list[dict]:
    return [r for r in _log(run_dir) if "eval_loss" not in r]


@pytest.fixture(scope="module")
def kto_runs(kto_assets, tmp_path_factory) -> Path:
    """Two chains side by side: micro-batch 4 (eval, a save at step 2) then its resume from step
    2; accumulation 4 x 1 then LoRA. Returns the output directory."""
    out = tmp_path_factory.mktemp("kto_runs")
    a = kto_assets
    run_chains(timeout=900, chains=[
        [("micro4", "python", 1, lambda: _args(
            a, out, "micro4", "--micro_batch_size", "4", "--eval_data_path", str(a["data"]),
            "--save_steps", "2", "--save_optimizer", "--report_to", "tensorboard",
            "--kto_desirable_weight", "1.0", "--kto_undesirable_weight", "1.0")),
         ("resumed", "python", 1, lambda: _args(
             a, out, "resumed", "--micro_batch_size", "4", "--load_ckpt_path",
             str(out / "micro4" / "checkpoints" / "step_2")))],
        [("accum4", "python", 1, lambda: _args(
            a, out, "accum4", "--micro_batch_size", "1", "--gradient_accumulation_steps", "4")),
         ("lora", "python", 1, lambda: _args(
             a, out, "lora", "--micro_batch_size", "4", "--use_lora", "--learning_rate", "1e-2",
             "--kto_desirable_weight", "1.5"))],
    ])
    return out


def test_first_step_metrics_and_outputs(kto_runs, kto_assets):
    out = kto_runs
    train = _train(out / "micro4")
    assert len(train) == STEPS
    first = train[0]
    assert abs(first["loss"] - 0.5) < 1e-6 and first["kl"] == 0.0
    assert abs(first["rewards/chosen"] or 0.0) < 1e-6 and abs(first["rewards/rejected"] or 0) < 1e-6
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
                "logps/rejected", "kl", "examples_per_step", "desirable_fraction"):
        assert all(key in r for r in train), key
    assert all(r["examples_per_step"] == 4 for r in train)
    # it learns: the desirable completions' log-probs rise over the reference's, and on the
    # whole set the desirable ones rise more than the undesirable ones (KTO's loss itself need
    # not fall over 4 steps: each step has other examples and z0 moves)
    assert all(r["rewards/chosen"] > 0 for r in train[1:])
    (ev,) = [r for r in _log(out / "micro4") if "eval_loss" in r]
    examples = json.loads((kto_assets["data"] / "manifest.json").read_text())["kto"]["examples"]
    assert ev["eval_examples"] == examples and ev["eval_kl"] > 0
    assert ev["eval_rewards/margins"] > 0
    assert (out / "micro4" / "preference_curves.png").stat().st_size > 1000
    assert list((out / "micro4" / "tensorboard").glob("events.*"))
    resolved = json.loads((out / "micro4" / "checkpoints" / f"step_{STEPS}" /
                           "resolved_config.json").read_text())
    assert resolved["objective"] == "kto" and resolved["reference"].startswith("model ")
    assert resolved["args"]["kto_desirable_weight"] == 1.0


def test_accumulation_and_resume_equal_the_run(kto_runs):
    out = kto_runs
    base = [r["loss"] for r in _train(out / "micro4")]
    accum = [r["loss"] for r in _train(out / "accum4")]
    assert max(abs(x - y) for x, y in zip(base, accum)) <= TOL, (base, accum)
    for key in ("kl", "rewards/chosen", "logps/rejected"):
        x, y = [r[key] for r in _train(out / "micro4")], [r[key] for r in _train(out / "accum4")]
        assert max(abs((u or 0) - (v or 0)) for u, v in zip(x, y)) <= 1e-4, (key, x, y)
    resumed = [r["loss"] for r in _train(out / "resumed")]
    assert len(resumed) == STEPS - 2
    assert max(abs(x - y) for x, y in zip(base[2:], resumed)) <= TOL, (base, resumed)


def test_lora_reference_is_the_adapter_free_policy(kto_runs):
    run = kto_runs / "lora"
    train = _train(run)
    # policy == reference at step 1: each loss is w (1 - sigmoid(0)) = w / 2, w_d = 1.5, w_u = 1
    want = (1.5 * train[0]["desirable_fraction"] + (1 - train[0]["desirable_fraction"])) / 2
    assert abs(train[0]["loss"] - want) < 1e-6 and all(r["rewards/chosen"] > 0 for r in train[1:])
    resolved = json.loads((run / "checkpoints" / f"step_{STEPS}" /
                           "resolved_config.json").read_text())
    assert resolved["reference"] == "policy with LoRA adapters disabled"


def test_bad_combinations_refused(kto_assets, tmp_path, capsys):
    """Checked before torch loads (in this process): every problem at once, exit 2."""
    from trainer.train import main
    with pytest.raises(SystemExit) as exc:
        main(_args(kto_assets, tmp_path, "bad", "--micro_batch_size", "1",
                   "--precomputed_ref_logps", "--kto_desirable_weight", "0"))
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    for words in ("--precomputed_ref_logps is not supported with --objective kto",
                  "must be > 0", "at least 2 examples"):
        assert words in err, (words, err)
    with pytest.raises(SystemExit) as exc:
        main(_args(kto_assets, tmp_path, "bad2", "--objective", "dpo",
                   "--kto_undesirable_weight", "2"))
    assert exc.value.code == 2 and "is for --objective kto" in capsys.readouterr().err


def test_kto_and_pair_data_are_not_mixed(kto_assets):
    from shardfmt import open_dataset
    from trainer.errors import UsageError
    from trainer.preference import check_datasets
    ds = open_dataset(kto_assets["data"])
    with pytest.raises(UsageError, match="unpaired feedback .* use --objective kto"):
        check_datasets("dpo", {"--data_path": [ds]})
    with pytest.raises(UsageError, match="train it with --objective kto"):
        check_datasets("sft", {"--data_path": [ds]})
    check_datasets("kto", {"--data_path": [ds]})   # no error


@pytest.mark.slow
def test_two_ranks_zero3_in_lockstep(kto_assets, kto_runs, tmp_path):
    """2 ranks under ZeRO-3 (the KL forwards gather partitioned weights, so every rank must run
    them in step), with eval: the run ends and learns. Step 1 has z0 = 0 exactly (policy ==
    reference) whatever the pairing, so its update is the 1-process run's (global normalisation):
    step 2's rewards and log-probs equal micro4's; from then on z0 differs by design (each rank
    rotates its own examples), so the losses do too."""
    from trainer_testlib import run_train
    run_train(_args(kto_assets, tmp_path, "z3", "--micro_batch_size", "2", "--zero_stage", "3",
                    "--eval_data_path", str(kto_assets["data"])),
              launcher="torchrun", nproc=2, timeout=900)
    train = _train(tmp_path / "z3")
    assert abs(train[0]["loss"] - 0.5) < 1e-6 and all(r["rewards/chosen"] > 0 for r in train[1:])
    assert all(r["examples_per_step"] == 4 for r in train)
    one = _train(kto_runs / "micro4")[1]
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert abs(train[1][key] - one[key]) <= 1e-4, (key, train[1][key], one[key])
    (ev,) = [r for r in _log(tmp_path / "z3") if "eval_loss" in r]
    assert ev["eval_examples"] == json.loads((kto_assets["data"] / "manifest.json")
                                             .read_text())["kto"]["examples"]
