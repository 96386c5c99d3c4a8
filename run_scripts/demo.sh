#!/usr/bin/env bash
# The demo: template -> tokenizer -> tiny model -> encode -> train on 2 CPU ranks -> export ->
# generate on held-out prompts. No GPU, no network, a few minutes on 2 cores.
#   bash run_scripts/demo.sh            # full (600 steps)
#   bash run_scripts/demo.sh --quick    # short smoke variant
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash run_scripts/setup_venv.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# DeepSpeed JIT-builds a small CPU op once (~20 s); a cache private to the venv, with the venv's own
# ninja first on PATH, keeps it from being rebuilt on every run.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$root/.venv/torch_extensions}"
export PATH="$root/.venv/bin:$PATH"
exec .venv/bin/python run_scripts/demo.py "$@"
