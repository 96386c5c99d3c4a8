#!/usr/bin/env bash
# The demo: template -> tokenizer -> tiny model -> encode -> train on 2 CPU ranks -> export ->
# generate on held-out prompts. No GPU, no network, a few minutes on 2 cores.
#   bash run_scripts/demo.sh            # full (600 steps)
#   bash run_scripts/demo.sh --quick    # short smoke variant
# run_scripts/dpo.sh runs the preference demo through this same set-up (DEMO_SCRIPT=dpo.py).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash run_scripts/setup_venv.sh
source run_scripts/env.sh
exec .venv/bin/python "run_scripts/${DEMO_SCRIPT:-demo.py}" "$@"
