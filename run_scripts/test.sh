#!/usr/bin/env bash
# The test command: sets up .venv if needed, then runs the whole suite (slow end-to-end tests too).
#   bash run_scripts/test.sh                 # everything (what CI runs)
#   bash run_scripts/test.sh -m "not slow"   # skip the multi-process end-to-end runs
#   bash run_scripts/test.sh tests/shardfmt  # one package
#   bash run_scripts/test.sh -n 0            # in this process, no workers (e.g. to use pdb)
# Two pytest-xdist workers, one per core: most tests are single-process (OMP_NUM_THREADS=1), so one
# process leaves a core idle. A test module is one unit of work (tests/conftest.py: its
# module-scoped runs are built once); the heaviest modules are handed out first.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash run_scripts/setup_venv.sh
source run_scripts/env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
.venv/bin/python run_scripts/prebuild_deepspeed_ops.py   # JIT ops once, not inside timed runs
# What the suite starts with, for reading a CI log: leftovers in /dev/shm are RAM (tmpfs), and a
# nearly full one makes DeepSpeed runs die with SIGBUS or the OOM killer take a pytest worker.
echo "[test] $(nproc --all) cores; $(free -g | awk '/^Mem:/ {print $7}') GiB RAM available;" \
     "/dev/shm: $(df -h /dev/shm | awk 'NR==2 {print $3 " used of " $2}')"
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n "${TEST_WORKERS:-2}" --dist loadfile --durations 15 \
    --no-loadscope-reorder "$@"
