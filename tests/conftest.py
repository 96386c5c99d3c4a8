"""Shared test fixtures: where ../shared lives, and skipping cleanly when it is absent."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "LLM_ENCODE_CACHE" not in os.environ:
    # the encoder's calibration/vocab-hash cache (encoder/verdict_cache.py): one per test process,
    # never the user's ~/.cache, so results do not depend on earlier runs on the machine
    import atexit
    import shutil
    import tempfile
    os.environ["LLM_ENCODE_CACHE"] = tempfile.mkdtemp(prefix="llm-encode-cache-")
    atexit.register(shutil.rmtree, os.environ["LLM_ENCODE_CACHE"], True)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """`../shared` beside the repo (real tokenizers and data); skips the test when absent."""
    if not (SHARED / "tokenizers").is_dir():
        pytest.skip(f"{SHARED} not found: real tokenizers/data are only beside the CI checkout")
    return SHARED


# ------------------------------------------------------------------ parallel runs (pytest-xdist)
# run_scripts/test.sh runs the suite on 2 workers: `-n 2 --dist loadfile --no-loadscope-reorder`.
# A unit of work is a whole test module, so its module-scoped fixtures (the end-to-end runs of
# test_ds_configs.py, test_mixing_e2e.py, ...) are built once, by one worker; and the modules that
# share the session's 2-rank ZeRO-2 run (tests/trainer/conftest.py's zero2_run) are one unit, so
# that run is made once, not once per worker. Units are handed out in the order of the items: the
# heaviest (most slow tests) first, so the last unit a worker picks up is a short one.
# (xdist's own loadgroup cannot be used: it renames items in a way pytest >= 9 ignores.)
SHARED_RUN = "zero2_run"
SHARED_RUN_MODULES = ("tests/trainer/test_e2e.py", "tests/trainer/test_export_generate.py",
                      "tests/trainer/test_ds_configs.py", "tests/trainer/test_trainer_exit_codes.py")


# Modules whose module-scoped fixtures are cheap (a tokenizer load, a 48-sample dataset), so each
# test may go to either worker: the families matrix (13 in-process trainings) fills both cores.
SPLIT_MODULES = ("tests/trainer/test_families.py",)


def work_unit(nodeid: str) -> str:
    module = nodeid.split("::", 1)[0]
    if module in SPLIT_MODULES:
        return nodeid
    return SHARED_RUN if module in SHARED_RUN_MODULES else module


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadfile":
        return None  # xdist's own scheduler for the other modes
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return ModuleScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SHARED_RUN in item.fixturenames and work_unit(item.nodeid) != SHARED_RUN:
            warnings.warn(f"{item.nodeid} uses {SHARED_RUN}: add its module to SHARED_RUN_MODULES "
                          "in tests/conftest.py, or 2 xdist workers may each make the run")
    slow_tests: dict[str, int] = {}
    first_seen: dict[str, int] = {}
    for item in items:
        unit = work_unit(item.nodeid)
        slow_tests[unit] = slow_tests.get(unit, 0) + (item.get_closest_marker("slow") is not None)
        first_seen.setdefault(unit, len(first_seen))
    # stable: within a unit (and among units of equal weight) the collection order stands
    items.sort(key=lambda item: (-slow_tests[work_unit(item.nodeid)],
                                 first_seen[work_unit(item.nodeid)]))
