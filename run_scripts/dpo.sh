#!/usr/bin/env bash
# The preference demo: SFT then DPO on the email task, on 2 CPU ranks (run_scripts/dpo.py).
#   bash run_scripts/dpo.sh            # full: held-out reward accuracy >= 95%, exact match kept
#   bash run_scripts/dpo.sh --quick    # short smoke variant (CI)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash run_scripts/setup_venv.sh
source run_scripts/env.sh
exec .venv/bin/python run_scripts/dpo.py "$@"
