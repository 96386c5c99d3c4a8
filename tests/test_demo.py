"""The README's demo command, in its quick variant: every stage runs for real, and every artifact
it announces exists."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_quick_runs_end_to_end(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    proc = subprocess.run([sys.executable, "run_scripts/demo.py", "--quick", "--out",
                           str(tmp_path / "demo")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    out = proc.stdout
    for stage in ("4. encode", "5. train", "6. export", "7. generate", "artifacts"):
        assert f"=== {stage}" in out
    assert "held-out exact match:" in out
    assert "(missing!)" not in out
    assert (tmp_path / "demo" / "exported_model" / "prompt_format.json").is_file()
    assert (tmp_path / "demo" / "runs" / "emails" / "checkpoints" / "step_60").is_dir()  # mid-way
