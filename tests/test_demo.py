"""The README's demo command, in its quick variant cut to 4 optimizer steps: every stage runs for
real (tokenizer, model, encode, 2-rank DeepSpeed training with a mid-way checkpoint, export,
generate), and every artifact it announces exists."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = 4


@pytest.mark.slow
def test_demo_quick_runs_end_to_end(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    # a longer run only adds optimizer steps (~0.2 s each): --quick asserts no accuracy anyway
    # through the README's command (demo.sh: venv check, env.sh, then demo.py)
    proc = subprocess.run(["bash", "run_scripts/demo.sh", "--quick", "--steps", str(STEPS),
                           "--out", str(tmp_path / "demo")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    out = proc.stdout
    for stage in ("4. encode", "5. train", "6. export", "7. generate", "artifacts"):
        assert f"=== {stage}" in out
    assert "held-out exact match:" in out
    assert "(missing!)" not in out
    assert (tmp_path / "demo" / "exported_model" / "prompt_format.json").is_file()
    ckpts = tmp_path / "demo" / "runs" / "emails" / "checkpoints"
    assert (ckpts / f"step_{STEPS // 2}").is_dir()  # mid-way
    assert (ckpts / "latest").read_text().strip() == f"step_{STEPS}"
