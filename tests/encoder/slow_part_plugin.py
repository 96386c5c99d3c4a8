"""A part-aware qa plugin for the distributed tests: ROWS rows cut with encoder.plugins.part_bounds,
DELAY seconds per row, and after 30 rows of a part it creates PID_DIR/part{k}-{pid}, so the Ray
cluster test can kill that worker process in the middle of the part."""

import os
import time
from pathlib import Path

from encoder.plugins import part_bounds


def data_loader(rows="800", delay="0", pid_dir="", part_index=None, num_parts=None):
    i, n = (0, 1) if part_index is None else (int(part_index), int(num_parts))
    lo, hi = part_bounds(i, n, int(rows))
    for r in range(lo, hi):
        if pid_dir and r - lo == 30:
            Path(pid_dir, f"part{i}-{os.getpid()}").touch()
        time.sleep(float(delay))
        yield {"q": f"Question {r}: what is {r} plus {r}?", "a": f"It is {2 * r}."}
