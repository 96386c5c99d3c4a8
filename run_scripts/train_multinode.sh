#!/usr/bin/env bash
# Train on several nodes with DeepSpeed's launcher. Run this on ONE node (it ssh-es to the others).
#
# What must be identical on every node, at the same path (a shared filesystem is simplest):
#   * this repository and its .venv (or the same packages installed),
#   * MODEL and DATA (read by every rank),
#   * OUTPUT: checkpoints are written by all ranks together (rank 0 writes the HF files and
#     metadata, every rank its own ZeRO shards and RNG state), so it MUST be shared storage.
# The hostfile lists one node per line with its GPU count:
#     node-a slots=8
#     node-b slots=8
# and passwordless ssh from this node to every node is required. Without ssh, start
# `torchrun --nnodes N --node_rank I --nproc_per_node 8 --master_addr HOST0 --master_port 29500
#  trainer/train.py ...` on each node instead (ranks come from the launcher's environment).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# ---- edit these -----------------------------------------------------------------------------
HOSTFILE=hostfile
MASTER_ADDR=node-a                # first host of the hostfile, reachable from all nodes
MASTER_PORT=29500
MODEL=/shared/models/base
DATA=/shared/data/alpaca
OUTPUT=/shared/runs
NAME=sft-multinode
ZERO_STAGE=3
MICRO_BATCH=2
ACCUM=4
LR=1e-5
EPOCHS=2
# ----------------------------------------------------------------------------------------------

source run_scripts/env.sh
deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    trainer/train.py \
    --model_path "$MODEL" --data_path $DATA --output_path "$OUTPUT" --save_name "$NAME" \
    --zero_stage "$ZERO_STAGE" --micro_batch_size "$MICRO_BATCH" \
    --gradient_accumulation_steps "$ACCUM" --learning_rate "$LR" --lr_scheduler cosine \
    --warmup_ratio 0.03 --max_epochs "$EPOCHS" --save_steps 500 --save_optimizer \
    --save_total_limit 3 --logging_steps 10
