"""run_scripts/extend_vocab.sh and run_scripts/pretrain_from_scratch.sh end to end in --quick mode
(every real program, a tiny model, a few steps): each must finish and generate."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (SHARED / "data" / "zh_xiyouji.txt").is_file(),
                                 reason="../shared (real tokenizers and data) is absent")]


def _run(script: str, out: Path) -> str:
    env = {**os.environ, "PYTHON": sys.executable, "SHARED": str(SHARED), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", f"run_scripts/{script}", "--quick", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def test_extend_vocab_quick(tmp_path):
    log = _run("extend_vocab.sh", tmp_path / "ev")
    assert "verified: all 32000 base tokens keep their ids" in log
    assert "resizing input and output embeddings: 32000 ->" in log
    assert "trainable_token_indices on embed_tokens and lm_head" in log
    answer = log.split("### 孙悟空是谁？", 1)[1]
    assert answer.strip() and "extend_vocab: done in" in answer


def test_pretrain_from_scratch_quick(tmp_path):
    log = _run("pretrain_from_scratch.sh", tmp_path / "pfs")
    assert "trained byte-level BPE, 2000 tokens" in log and "tokens/char" in log
    assert "continuing the prompts as plain text" in log
    assert "### First Citizen:" in log and "pretrain_from_scratch: done in" in log
