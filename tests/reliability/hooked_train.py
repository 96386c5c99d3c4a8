"""`trainer/train.py` with a checkpoint-save hook, for test_trainer_killed.py (not a test module).

Runs trainer.train.main() unchanged, except that when the save of step RELI_KILL_STEP reaches
RELI_KILL_POINT, every rank stops there (rank 0 writes the marker file RELI_MARK) and sleeps, so
the test can SIGKILL the whole run at a known point. The product has no such hook.

  weights_written   .tmp_step_N holds the HF weights; engine checkpoint, RNG, state not yet
  state_written     .tmp_step_N is complete (trainer_state.json written), not yet renamed
  after_latest      step_N renamed into place and `latest` updated to name it
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import trainer.checkpoint as ck  # noqa: E402

POINT = os.environ.get("RELI_KILL_POINT", "")
STEP = int(os.environ.get("RELI_KILL_STEP", "-1"))
TMP_NAME = f".tmp_step_{STEP}"


def _block(where: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        Path(os.environ["RELI_MARK"]).write_text(where)
    while True:
        time.sleep(60)


_real_weights, _real_json = ck.save_hf_weights, ck._write_json


def save_hf_weights(engine, tmp, info, zero3):
    _real_weights(engine, tmp, info, zero3)
    if POINT == "weights_written" and Path(tmp).name == TMP_NAME:
        _block(POINT)


def _write_json(path, obj):
    _real_json(path, obj)
    if POINT == "state_written" and path.name == ck.STATE_NAME and path.parent.name == TMP_NAME:
        _block(POINT)


_real_text = ck.write_text_atomic


def write_text_atomic(path, text, *args, **kwargs):  # blocks once `latest` names step N
    _real_text(path, text, *args, **kwargs)
    if POINT == "after_latest" and Path(path).name == "latest" and text.strip() == f"step_{STEP}":
        _block(POINT)


ck.save_hf_weights, ck._write_json, ck.write_text_atomic = save_hf_weights, _write_json, write_text_atomic

from trainer.train import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
