"""`bash run_scripts/dpo.sh --quick` (the CI variant of the preference demo): every stage runs for
real (tokenizer, model, SFT encode + 2-rank training + export, pair encode, 2-rank DPO with eval +
export, reward accuracy and generations before/after), cut to 2 optimizer steps each; the full run
(targets: reward accuracy >= 95%, exact match kept) is in the report's command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dpo_demo_quick(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    # through the README's command (dpo.sh -> demo.sh: venv check, env.sh, then dpo.py)
    proc = subprocess.run(["bash", "run_scripts/dpo.sh", "--quick", "--sft_steps", "2",
                           "--dpo_steps", "2", "--out", str(tmp_path / "dpo")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    assert "(missing!)" not in proc.stdout
    result = json.loads((tmp_path / "dpo" / "result.json").read_text())
    assert result["heldout_pairs"] == 60 and result["exact_match"]["of"] == 60
    assert result["reward_accuracy"]["sft"] == 0.0   # policy == reference: every reward is 0
    log = [json.loads(x) for x in
           (tmp_path / "dpo" / "runs" / "dpo" / "train_log.jsonl").read_text().splitlines()]
    assert any("eval_rewards/accuracies" in r for r in log)
