"""Fixtures for trainer tests (helpers live in trainer_testlib.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from trainer_testlib import (base_args, build_model, build_tokenizer, only_run_dir,  # noqa: E402
                             run_train, write_dataset)


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict:
    """tokenizer dir + tiny llama (tied) + qwen2 (untied) + train/eval datasets."""
    root = tmp_path_factory.mktemp("assets")
    tok = build_tokenizer(root / "llama")
    build_model(root / "llama", vocab_size=len(tok))
    tok.save_pretrained(str(root / "qwen2"))
    build_model(root / "qwen2", vocab_size=len(tok), kind="qwen2", tie=False)
    train = write_dataset(root / "data", "train", tok, num_samples=96, seed=1)
    evald = write_dataset(root / "data", "eval", tok, num_samples=10, seed=2)
    return {"root": root, "tokenizer": tok, "llama": root / "llama", "qwen2": root / "qwen2",
            "train": train, "eval": evald}


@pytest.fixture(scope="session")
def zero2_run(assets, tmp_path_factory) -> Path:
    """One 2-rank DeepSpeed ZeRO-2 run (STEPS = 8 steps; eval, and a save with the optimizer, at 4
    and 8): its run dir. Session-scoped: test_e2e.py checks it, resumes from it and compares other
    runs with it, and test_export_generate.py exports its engine checkpoint, so the suite launches
    it once."""
    out = tmp_path_factory.mktemp("zero2")
    run_train(base_args(assets, out, "--micro_batch_size", "1", "--gradient_accumulation_steps", "2",
                        "--save_steps", "4", "--save_optimizer", "--zero_stage", "2",
                        "--eval_data_path", str(assets["eval"]), "--eval_steps", "4",
                        "--report_to", "tensorboard"),
              launcher="deepspeed", nproc=2)
    return only_run_dir(out)
