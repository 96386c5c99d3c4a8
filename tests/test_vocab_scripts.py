"""run_scripts/extend_vocab.sh and run_scripts/pretrain_from_scratch.sh end to end in --quick mode
(every real program, a tiny model, a few steps): each must finish and generate."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from side_by_side import run_side_by_side

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (SHARED / "data" / "zh_xiyouji.txt").is_file(),
                                 reason="../shared (real tokenizers and data) is absent")]


SCRIPTS = ("extend_vocab.sh", "pretrain_from_scratch.sh")


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> dict[str, str]:
    """Both recipes, started together: each is a chain of single-process programs (mostly
    interpreter start-up and imports, one core each), so side by side on the 2 cores they take
    about the time of the longer one. Each log is its stdout + stderr; a failure names the script."""
    env = {**os.environ, "PYTHON": sys.executable, "SHARED": str(SHARED), "OMP_NUM_THREADS": "1"}
    root = tmp_path_factory.mktemp("recipes")
    procs = run_side_by_side([["bash", f"run_scripts/{script}", "--quick", str(root / script)]
                              for script in SCRIPTS], cwd=REPO, env=env, timeout=900)
    return {script: (proc.returncode, proc.stdout, proc.stderr)
            for script, proc in zip(SCRIPTS, procs)}


def _log(logs: dict, script: str) -> str:
    returncode, stdout, stderr = logs[script]
    assert returncode == 0, f"{script}: exit {returncode}\n" + stdout[-3000:] + stderr[-5000:]
    return stdout + stderr


def test_extend_vocab_quick(logs):
    log = _log(logs, "extend_vocab.sh")
    assert "verified: all 32000 base tokens keep their ids" in log
    assert "resizing input and output embeddings: 32000 ->" in log
    assert "trainable_token_indices on embed_tokens and lm_head" in log
    answer = log.split("### 孙悟空是谁？", 1)[1]
    assert answer.strip() and "extend_vocab: done in" in answer


def test_pretrain_from_scratch_quick(logs):
    log = _log(logs, "pretrain_from_scratch.sh")
    assert "trained byte-level BPE, 2000 tokens" in log and "tokens/char" in log
    assert "continuing the prompts as plain text" in log
    assert "### First Citizen:" in log and "pretrain_from_scratch: done in" in log
