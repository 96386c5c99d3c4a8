"""Fixtures for trainer tests (helpers live in trainer_testlib.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from trainer_testlib import build_model, build_tokenizer, write_dataset  # noqa: E402


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
