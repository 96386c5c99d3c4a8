#!/usr/bin/env bash
# Pretraining from scratch (baby-llama2 style), on a tiny Llama on CPU:
#   1. train a byte-level BPE tokenizer on wiki_demo + tinyshakespeare
#   2. a config-only tiny Llama sized to it
#   3. encode the text  4. train --from_scratch  5. export  6. generate (plain continuation)
#   bash run_scripts/pretrain_from_scratch.sh [--quick] [OUT_DIR]   (default: out/pretrain_from_scratch)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
default_out=out/pretrain_from_scratch
source run_scripts/recipe_args.sh "$@"
if [ "$quick" = 1 ]; then
    vocab=2000; steps=4; max_len=128; batch=2
else
    vocab=8000; steps=300; max_len=256; batch=8
fi
start=$(date +%s)
rm -rf "$out"
mkdir -p "$out"
text="path=$shared/data/wiki_demo.txt,$shared/data/tinyshakespeare.txt"

echo "== 1. train a tokenizer"
"$py" -m encoder.tokenizer train --data_loader_path encoder/user_data_loader/text.py \
    --data_loader_args "$text" split=line --model bpe --vocab_size "$vocab" \
    --output "$out/tokenizer"

echo "== 2. config-only tiny Llama"
"$py" run_scripts/tiny_model.py --tokenizer "$out/tokenizer" --output "$out/config" --config_only

echo "== 3. encode"
"$py" encoder/main.py --tokenizer_path "$out/tokenizer" \
    --data_loader_path encoder/user_data_loader/text.py --data_loader_args "$text" split=paragraph \
    --corpus_name text --encode_type pretrain --output_path "$out/data" \
    --max_length "$max_len" --merge_data

echo "== 4. train from scratch"
"$py" trainer/train.py --model_path "$out/config" --from_scratch --data_path "$out/data/text" \
    --output_path "$out/runs" --save_name scratch --no_timestamp --max_steps "$steps" \
    --micro_batch_size "$batch" --learning_rate 3e-3 --warmup_ratio 0.05 --logging_steps 20

echo "== 5. export"
"$py" -m trainer.export --checkpoint "$out/runs/scratch" --output "$out/model"

echo "== 6. generate (plain text: no --template for a pretrained model)"
"$py" -m trainer.generate --model "$out/model" --prompt "First Citizen:" --max_new_tokens 32
echo "pretrain_from_scratch: done in $(( $(date +%s) - start ))s -> $out"
