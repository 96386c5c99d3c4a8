#!/usr/bin/env bash
# Creates ./.venv (if missing) and installs the project with every extra the demo and tests need.
# Idempotent: a second run only checks that the install is complete (a marker file records it).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
marker="$venv/.installed-$(cat setup.cfg run_scripts/setup_venv.sh | sha1sum | cut -c1-12)"
if [ -f "$marker" ]; then
  exit 0
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv"
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
# torch first, pinned: on these machines 2.13.0 is a local CPU wheel (seconds). An unpinned range on
# an empty venv would pull a multi-GB CUDA build. On a GPU machine, install your own torch first.
if ! "$py" -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==2.13.0 (CPU wheel)"
  "$py" -m pip install -q torch==2.13.0
fi
echo "[setup] installing the project and its extras (encode, train, dev)"
"$py" -m pip install -q -e ".[encode,train,dev]"
rm -f "$venv"/.installed-*
touch "$marker"
echo "[setup] done: $venv"
