# Sourced by the run_scripts: the environment every program of this repo runs in.
# (offline Hugging Face; quiet tokenizers; DeepSpeed's one JIT-built CPU op (~20 s) cached inside the
# venv, with the venv's own ninja first on PATH, so it is built once, not on every run.)
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$root/.venv/torch_extensions}"
export PATH="$root/.venv/bin:$PATH"
