"""`trainer/train.py` whose rank 0 alone fails to write the weights of step RELI_FAIL_STEP (as a
full disk on rank 0's node would), for test_save_fails_on_one_rank.py (not a test module).
The product has no such hook."""

import errno
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import trainer.checkpoint as ck  # noqa: E402

STEP = int(os.environ["RELI_FAIL_STEP"])
_real_weights = ck.save_hf_weights


def save_hf_weights(engine, tmp, info, zero3):
    _real_weights(engine, tmp, info, zero3)
    if info.rank == 0 and Path(tmp).name == f".tmp_step_{STEP}":
        raise OSError(errno.ENOSPC, "No space left on device (injected on rank 0)", str(tmp))


ck.save_hf_weights = save_hf_weights

if __name__ == "__main__":
    from trainer.train import main
    sys.exit(main())
