"""Sampler scale: memory and time to the first batch for 1e6 / 1e8 / 1e9 samples, and on resume;
then the weighted mix (`--data_path 0.7 A 0.3 B`, BlendedSampler): resume cost and throughput.

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
from shardfmt.mixing import BlendedSampler  # noqa: E402

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
    blended()


def blended() -> None:
    """A resumed mix sums the per-source counts of every earlier block (checkpointed every 1024
    blocks): the cost of the first batch grows with the steps already done."""
    sizes, weights, block = [10**7] * 10, [0.1] * 10, 64  # 10 sources, global batch 64
    print(f"\nweighted mix: {len(sizes)} sources, global batch {block}; first batch = {BATCH} "
          f"indices for rank 0 of {WORLD}\n")
    print("| resumed at step | first batch: time | then: indices/s |\n|---|---|---|")
    for steps in (0, 10**4, 10**6):
        t0 = time.perf_counter()
        sampler = BlendedSampler(sizes, weights, block=block, seed=1)
        it = sampler.iter_rank(steps * block, 0, WORLD, block=BATCH)
        next(it)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(5):
            next(it)
        rate = 5 * BATCH / (time.perf_counter() - t0)
        print(f"| {steps:,} | {first * 1e3:.0f} ms | {rate:,.0f} |")


if __name__ == "__main__":
    main()
