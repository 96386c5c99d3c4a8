"""Shared test fixtures: where ../shared lives, and skipping cleanly when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """`../shared` beside the repo (real tokenizers and data); skips the test when absent."""
    if not (SHARED / "tokenizers").is_dir():
        pytest.skip(f"{SHARED} not found: real tokenizers/data are only beside the CI checkout")
    return SHARED
