"""Weighted mixing and Megatron data in trainer/train.py: `--data_path 0.75 OURS 0.25 MEGATRON`
(the Megatron prefix built by megatron-core's IndexedDatasetBuilder), per-source logs, per-source
eval, exact resume, the same run on 2 ranks, and the refusals of ambiguous mixes."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from trainer_testlib import COMMON, counting_doc, only_run_dir, run_chains, run_train

STEPS4 = ["--max_steps", "4"]


@pytest.fixture(scope="module")
def megatron_prefixes(assets, tmp_path_factory) -> dict:
    """Counting documents (the trainer tests' learnable task) as Megatron train/eval prefixes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mcore = pytest.importorskip("megatron.core.datasets.indexed_dataset",
                                    reason="megatron-core not installed (in the dev extra)")
    import torch
    root = tmp_path_factory.mktemp("mega")
    rng = np.random.default_rng(11)
    out = {}
    for name, n_docs in (("mtrain", 20), ("meval", 6)):
        builder = mcore.IndexedDatasetBuilder(str(root / name) + ".bin", dtype=np.uint16)
        for _ in range(n_docs):
            doc = counting_doc(rng, int(rng.integers(8, 40)))
            builder.add_document(torch.from_numpy(doc.astype(np.int64)), [len(doc)])
        builder.finalize(str(root / name) + ".idx")
        out[name] = root / name
    return out


def _mix_args(assets, megatron_prefixes, out: Path, *extra: str,
              eval_weights: tuple[str, str] | None = None) -> list[str]:
    evals = [str(assets["eval"]), str(megatron_prefixes["meval"])]
    if eval_weights:
        evals = [eval_weights[0], evals[0], eval_weights[1], evals[1]]
    return ["--model_path", str(assets["llama"]),
            "--data_path", "0.75", str(assets["train"]), "0.25", str(megatron_prefixes["mtrain"]),
            "--eval_data_path", *evals,
            "--output_path", str(out), *COMMON, *STEPS4, "--micro_batch_size", "2",
            "--eval_steps", "2", *extra]


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


TWO_RANKS_TEST = "test_weighted_mix_on_two_ranks_matches_one"


@pytest.fixture(scope="module")
def mix_runs(request, assets, megatron_prefixes, tmp_path_factory) -> dict:
    """The weighted run (1 process, accumulation 2: global batch 4), saved at step 2 with the
    optimizer, then its resume from step 2; beside them, when the (slow) test that checks it is
    selected, the same run on 2 ranks (the 2 cores: the start-up of one overlaps the other)."""
    first = tmp_path_factory.mktemp("mix")
    resumed_out = tmp_path_factory.mktemp("mix_resumed")
    chains = [[
        ("run", "python", 1, lambda: _mix_args(
            assets, megatron_prefixes, first, "--gradient_accumulation_steps", "2",
            "--save_steps", "2", "--save_optimizer")),
        ("resumed", "python", 1, lambda: _mix_args(
            assets, megatron_prefixes, resumed_out, "--gradient_accumulation_steps", "2",
            "--save_steps", "2", "--save_optimizer", "--load_ckpt_path",
            str(only_run_dir(first) / "checkpoints" / "step_2"), eval_weights=("1", "3"))),
    ]]
    two_ranks_out = None
    if any(item.originalname == TWO_RANKS_TEST for item in request.session.items):
        two_ranks_out = tmp_path_factory.mktemp("mix_two_ranks")
        chains.append([("two_ranks", "torchrun", 2,
                        lambda: _mix_args(assets, megatron_prefixes, two_ranks_out))])
    run_chains(chains)
    return {"run": only_run_dir(first), "resumed": only_run_dir(resumed_out),
            "two_ranks": only_run_dir(two_ranks_out) if two_ranks_out else None}


def test_weighted_mix_logs_each_source(mix_runs, assets, megatron_prefixes):
    from shardfmt import open_dataset
    from shardfmt.mixing import BlendedSampler
    run = mix_runs["run"]
    train = [r for r in _log(run) if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    sizes = [len(open_dataset(assets["train"])), len(open_dataset(megatron_prefixes["mtrain"]))]
    for r in train:
        # 3 + 1 samples of every global batch of 4: exactly the weights
        assert r["samples_seen/train"] == 3 * r["step"] and r["samples_seen/mtrain"] == r["step"]
        assert r["epoch/mtrain"] == pytest.approx(r["step"] / sizes[1])
        # the per-source losses recombine into the step's loss (computed another way)
        tokens = r["loss_tokens/train"] + r["loss_tokens/mtrain"]
        both = (r["loss/train"] * r["loss_tokens/train"]
                + r["loss/mtrain"] * r["loss_tokens/mtrain"]) / tokens
        assert both == pytest.approx(r["loss"], rel=1e-6)
    state = json.loads((run / "checkpoints" / "step_4" / "trainer_state.json").read_text())
    assert state["sampler"]["kind"] == "blend" and state["sampler"]["block"] == 4
    reference = BlendedSampler(sizes, [0.75, 0.25], block=4, seed=7)
    assert state["source_samples"] == reference.samples_seen(16) == [12, 4]
    evals = [r for r in _log(run) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        per = (r["eval_loss/eval"] * r["eval_loss_tokens/eval"]
               + r["eval_loss/meval"] * r["eval_loss_tokens/meval"])
        assert r["eval_loss_tokens"] == r["eval_loss_tokens/eval"] + r["eval_loss_tokens/meval"]
        assert per / r["eval_loss_tokens"] == pytest.approx(r["eval_loss"], rel=1e-9)


def test_weighted_mix_resumes_exactly(mix_runs):
    full = json.loads((mix_runs["run"] / "checkpoints" / "step_4" / "trainer_state.json")
                      .read_text())
    resumed = json.loads((mix_runs["resumed"] / "checkpoints" / "step_4" / "trainer_state.json")
                         .read_text())
    a = [h["loss"] for h in full["loss_history"]]
    b = [h["loss"] for h in resumed["loss_history"]]
    assert b[:2] == a[:2] and np.allclose(b[2:], a[2:], rtol=0, atol=1e-6), (a, b)
    assert resumed["source_samples"] == full["source_samples"]
    # the resumed run evaluated with weights `1 EVAL 3 MEVAL`: eval_loss is their weighted mean
    last = [r for r in _log(mix_runs["resumed"]) if "eval_loss" in r][-1]
    assert last["eval_loss"] == pytest.approx(0.25 * last["eval_loss/eval"]
                                              + 0.75 * last["eval_loss/meval"], rel=1e-12)
    same_model = [r for r in _log(mix_runs["run"]) if "eval_loss" in r][-1]
    assert last["eval_loss/meval"] == pytest.approx(same_model["eval_loss/meval"], abs=1e-5)


@pytest.mark.slow
def test_weighted_mix_on_two_ranks_matches_one(mix_runs):
    """Same global batch (2 ranks x 2 samples vs 1 rank x 2 x accumulation 2): same stream, same
    losses -- the mix does not depend on the number of ranks. (The run is mix_runs'.)"""
    two = json.loads((mix_runs["two_ranks"] / "checkpoints" / "step_4" / "trainer_state.json")
                     .read_text())
    one = json.loads((mix_runs["run"] / "checkpoints" / "step_4" / "trainer_state.json")
                     .read_text())
    assert np.allclose([h["loss"] for h in two["loss_history"]],
                       [h["loss"] for h in one["loss_history"]], rtol=0, atol=1e-6)
    assert two["source_samples"] == one["source_samples"]
    assert two["sampler"] == one["sampler"]


def test_ambiguous_mixes_and_missing_sources_fail_before_step_1(assets, megatron_prefixes,
                                                                tmp_path):
    from trainer.args import parse_args, validate_args
    base = ["--model_path", str(assets["llama"]), "--output_path", str(tmp_path), *STEPS4]
    cases = {
        ("0.7", str(assets["train"]), str(megatron_prefixes["mtrain"])): "ambiguously",
        (str(assets["train"]), "0.3", str(megatron_prefixes["mtrain"])): "ambiguously",
        ("0.5", str(assets["train"]), "0.5", str(assets["train"])): "given twice",
        ("1", str(tmp_path / "nope")): "nope: no such dataset",
    }
    for tokens, message in cases.items():
        problems = validate_args(parse_args(base + ["--data_path", *tokens]))
        assert any(message in p and "--data_path" in p for p in problems), (tokens, problems)
    ok = validate_args(parse_args(base + ["--data_path", str(megatron_prefixes["mtrain"]),
                                          "--eval_data_path", str(megatron_prefixes["meval"])]))
    assert ok == []
    proc = run_train(base + ["--data_path", "0.7", str(assets["train"]), "x"], check=False)
    assert proc.returncode == 2 and "ambiguously" in proc.stderr
