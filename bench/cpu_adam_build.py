"""First-build time of DeepSpeed's CPU Adam (the optimizer ZeRO-Offload needs), and its load time
once built. DeepSpeed JIT-compiles the op with the host C++ compiler into TORCH_EXTENSIONS_DIR on
first use; later processes load the cached .so.

    .venv/bin/python bench/cpu_adam_build.py                  # fresh temporary cache: the first build
    .venv/bin/python bench/cpu_adam_build.py --cache DIR      # build into / load from DIR

Prints one JSON line: {"first_load_s": ..., "second_load_s": ..., "cache": ..., "cores": ...}.
Each load runs in its own process (the op is cached per process).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

_LOAD = ("import torch, deepspeed\n"
         "from deepspeed.ops.adam import DeepSpeedCPUAdam\n"
         "p = torch.nn.Parameter(torch.zeros(4))\n"
         "DeepSpeedCPUAdam([p], lr=1e-3)\n")


def timed_load(cache: str) -> float:
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=cache, DS_ACCELERATOR="cpu")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", _LOAD], env=env, check=True, capture_output=True,
                   text=True)
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default=None, help="TORCH_EXTENSIONS_DIR (default: a fresh temp dir)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = a.cache or tmp
        first = timed_load(cache)
        second = timed_load(cache)
    print(json.dumps({"first_load_s": round(first, 1), "second_load_s": round(second, 1),
                      "cache": a.cache or "fresh temp dir", "cores": os.cpu_count()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
