"""What to do with a qa/chat sample longer than --max_length (pretrain is chunked instead).

  drop         (default) drop the sample; safest: no answer is cut, no prompt loses its question.
  right        keep the first max_length tokens; the answer may lose its end and its EOS.
  prompt_left  remove tokens from the start of the prompt (after BOS) until the sample fits;
               drop the sample if even the answers alone (+ BOS) do not fit.
A truncated sample with no trained token left is dropped. Every case is counted.
"""

from __future__ import annotations

import numpy as np

from encoder.errors import UsageError

TRUNCATION_MODES = ("drop", "right", "prompt_left")
DEFAULT_TRUNCATION = "drop"


def truncate(ids: np.ndarray, mask: np.ndarray, *, max_length: int, mode: str,
             keep_prefix: int) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    """Return `(ids, mask, status)` with status "ok", "truncated" or "dropped".

    `keep_prefix` tokens at the start (the BOS) are never removed by prompt_left.

    >>> ids, mask = np.arange(6), np.array([0, 0, 0, 0, 1, 1], bool)
    >>> truncate(ids, mask, max_length=4, mode="prompt_left", keep_prefix=1)[0].tolist()
    [0, 3, 4, 5]
    >>> truncate(ids, mask, max_length=4, mode="right", keep_prefix=1)[2]
    'dropped'
    """
    if len(ids) <= max_length:
        return ids, mask, "ok"
    if mode == "drop":
        return None, None, "dropped"
    if mode == "right":
        ids, mask = ids[:max_length], mask[:max_length]
    elif mode == "prompt_left":
        excess = len(ids) - max_length
        first_loss = int(np.argmax(mask)) if mask.any() else len(mask)
        if excess > first_loss - keep_prefix:
            return None, None, "dropped"
        keep = np.r_[0:keep_prefix, keep_prefix + excess:len(ids)]
        ids, mask = ids[keep], mask[keep]
    else:
        raise UsageError(f"--truncation {mode}: choose one of {', '.join(TRUNCATION_MODES)}")
    if not mask.any():
        return None, None, "dropped"
    return ids, mask, "truncated"
