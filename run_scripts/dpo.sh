#!/usr/bin/env bash
# The preference demo: SFT then DPO on the email task, on 2 CPU ranks (run_scripts/dpo.py), with
# demo.sh's set-up.
#   bash run_scripts/dpo.sh            # full: held-out reward accuracy >= 95%, exact match kept
#   bash run_scripts/dpo.sh --quick    # short smoke variant (CI)
set -euo pipefail
DEMO_SCRIPT=dpo.py exec bash "$(dirname "${BASH_SOURCE[0]}")/demo.sh" "$@"
