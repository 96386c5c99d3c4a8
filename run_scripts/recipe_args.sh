# Sourced by the recipe scripts (extend_vocab.sh, pretrain_from_scratch.sh) after `root` is set:
#   default_out=out/NAME; source run_scripts/recipe_args.sh "$@"
# Parses `[--quick] [OUT_DIR]` into quick (0/1) and out (default: $default_out), and sets the
# environment every program runs in (env.sh), shared (../shared, or $SHARED) and py (the venv's
# python, or $PYTHON).
source "$root/run_scripts/env.sh"
quick=0
if [ "${1:-}" = "--quick" ]; then quick=1; shift; fi
out="${1:-$default_out}"
shared="${SHARED:-$root/../shared}"
py="${PYTHON:-$root/.venv/bin/python}"
