#!/usr/bin/env bash
# GPU readiness in one command (CUDA only, < 8 min on one A100/H100-class GPU, no downloads):
#   bash bench/gpu_check.sh
# Prints a table (flash-attn varlen == sdpa_varlen, bf16 training of a ~100M model, the fused head
# on CUDA, QLoRA 4-bit, DPO on reference log-probs precomputed on the GPU, ZeRO-3 on one GPU,
# tokens/s + MFU of a ~0.7B model at 2048) and exits 1 on
# any mismatch. Without CUDA it prints one "skip:" line and exits 0. Uses the repo's .venv (which
# must hold a CUDA build of torch: see README "GPU check"); PYTHON=... overrides.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-$root/.venv/bin/python}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
exec "$py" "$root/bench/gpu/gpu_check.py" "$@"
