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


# ------------------------------------------------------------------ parallel runs (pytest-xdist)
# run_scripts/test.sh runs the suite on 2 workers: `-n 2 --dist loadgroup --no-loadscope-reorder`.
# Units of work are xdist groups: a whole test module each, so a module-scoped fixture (the
# end-to-end runs of test_ds_configs.py, test_mixing_e2e.py, ...) is built once, by one worker.
# Modules that share an expensive session-scoped fixture are one group (the fixture is then built
# once, not once per worker). Groups are handed out in the order of the items; the heaviest (most
# slow tests) go first, so that the last unit a worker picks up is a short one.
SHARED_SESSION_FIXTURES = ("zero2_run",)  # tests/trainer/conftest.py: one 2-rank DeepSpeed run


def pytest_collection_modifyitems(config, items):
    group_of = {}  # module nodeid -> group name
    for item in items:
        module = item.nodeid.split("::", 1)[0]
        shared = next((f for f in SHARED_SESSION_FIXTURES if f in item.fixturenames), None)
        if shared:
            group_of[module] = shared
        else:
            group_of.setdefault(module, module)
    slow_tests: dict[str, int] = {}
    for item in items:
        group = group_of[item.nodeid.split("::", 1)[0]]
        slow_tests[group] = slow_tests.get(group, 0) + (item.get_closest_marker("slow") is not None)
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(group))
    first_seen = {}
    for item in items:
        first_seen.setdefault(group_of[item.nodeid.split("::", 1)[0]], len(first_seen))
    # stable: within a group (and among groups of equal weight) the collection order stands
    items.sort(key=lambda item: (-slow_tests[group_of[item.nodeid.split("::", 1)[0]]],
                                 first_seen[group_of[item.nodeid.split("::", 1)[0]]]))
