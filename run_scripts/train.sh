#!/usr/bin/env bash
# Train on one node (all its GPUs; CPU ranks when there is no GPU). Edit, then:
#   bash run_scripts/train.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# ---- edit these -----------------------------------------------------------------------------
MODEL=path/to/hf_model            # config + weights (+ tokenizer); with FROM_SCRATCH=1 a config only
DATA=out/alpaca                   # one or more dataset dirs written by the encoder
OUTPUT=runs
NAME=sft
NUM_GPUS=8                        # processes on this node (CPU ranks if no GPU)
ZERO_STAGE=2                      # 2 (optimizer+grads sharded) or 3 (+ parameters sharded)
MICRO_BATCH=4                     # samples per rank per micro-step
ACCUM=8                           # micro-steps per optimizer step
LR=2e-5
EPOCHS=3
EXTRA=""                          # e.g. "--use_lora --lora_config_path lora.json" or "--add_tokens <tool>"
# ----------------------------------------------------------------------------------------------

bash run_scripts/setup_venv.sh
source run_scripts/env.sh

# Global batch = NUM_GPUS x MICRO_BATCH x ACCUM samples; the loss is the mean over every loss token
# of that global batch. Checkpoints: OUTPUT/<timestamp>_NAME/checkpoints/step_N (HF format).
# Resume after an interruption: add  --load_ckpt_path OUTPUT/<timestamp>_NAME  (exact, no replay).
deepspeed --num_gpus "$NUM_GPUS" trainer/train.py \
    --model_path "$MODEL" --data_path $DATA --output_path "$OUTPUT" --save_name "$NAME" \
    --zero_stage "$ZERO_STAGE" --micro_batch_size "$MICRO_BATCH" \
    --gradient_accumulation_steps "$ACCUM" --learning_rate "$LR" --lr_scheduler cosine \
    --warmup_ratio 0.03 --max_epochs "$EPOCHS" --save_steps 500 --save_optimizer \
    --save_total_limit 3 --logging_steps 10 --report_to tensorboard $EXTRA
