"""Sampler scale: memory and time to the first batch for 1e6 / 1e8 / 1e9 samples, and on resume.

    .venv/bin/python bench/sampler_scale.py

`GlobalSampler` never materialises a permutation, so both numbers should be flat in N. For
contrast, the row "np.random.permutation" is what a materialised shuffle costs (measured up to
1e8; at 1e9 it would need 8 GB and is only extrapolated).
"""

from __future__ import annotations

import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shardfmt import GlobalSampler  # noqa: E402

BATCH = 4096      # indices a rank asks for at once
WORLD = 8


def first_batch(n: int, consumed: int) -> tuple[float, float]:
    """Seconds and peak bytes from a saved state to rank 0's first batch of indices."""
    state = GlobalSampler(n, seed=1234).state_dict(consumed)
    tracemalloc.start()
    t0 = time.perf_counter()
    sampler, start = GlobalSampler.from_state_dict(state)
    idx = sampler.indices(sampler.rank_positions(start, 0, WORLD, BATCH))
    elapsed = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(idx) == BATCH and idx.max() < n
    return elapsed, peak


def materialised(n: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    perm = np.random.default_rng(0).permutation(n)
    return time.perf_counter() - t0, perm.nbytes


def main() -> None:
    print(f"first batch = {BATCH} indices for rank 0 of {WORLD}; medians of 5 runs\n")
    print("| samples | fresh: time | fresh: peak memory | resume mid-epoch 3: time | "
          "resume: peak memory | np.random.permutation |\n|---|---|---|---|---|---|")
    for n in (10**6, 10**8, 10**9):
        fresh = [first_batch(n, 0) for _ in range(5)]
        resumed = [first_batch(n, 3 * n + n // 2) for _ in range(5)]
        if n <= 10**8:
            t, b = materialised(n)
            mat = f"{t:.2f} s, {b / 2**20:,.0f} MiB"
        else:
            mat = f"(~{8 * n / 2**30:.0f} GiB, not run)"
        print(f"| {n:.0e} | {statistics.median(f[0] for f in fresh) * 1e3:.2f} ms | "
              f"{statistics.median(f[1] for f in fresh) / 1024:.0f} KiB | "
              f"{statistics.median(r[0] for r in resumed) * 1e3:.2f} ms | "
              f"{statistics.median(r[1] for r in resumed) / 1024:.0f} KiB | {mat} |")


if __name__ == "__main__":
    main()
