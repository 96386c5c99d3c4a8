#!/usr/bin/env bash
# A new language on a base model (the Chinese-LLaMA-Alpaca recipe), on a tiny Llama on CPU:
#   1. extend the llama2 tokenizer with Chinese pieces trained on zh_xiyouji.txt
#   2. a tiny Llama with the llama2 vocabulary (stands in for Llama-2)
#   3. encode the book with the extended tokenizer
#   4. continued pretraining: LoRA + the new embedding rows (--tokenizer_path grows the embeddings,
#      new rows initialised by decomposition into llama2 pieces)
#   5. merge (export)  6. SFT on alpaca_zh with LoRA  7. merge  8. generate a Chinese answer
#   bash run_scripts/extend_vocab.sh [--quick] [OUT_DIR]     (default OUT_DIR: out/extend_vocab)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
default_out=out/extend_vocab
source run_scripts/recipe_args.sh "$@"
if [ "$quick" = 1 ]; then
    vocab=3000; pt_steps=10; sft_steps=10; max_len=128; sft_len=768; batch=2; lr=1e-2
else
    vocab=20000; pt_steps=150; sft_steps=150; max_len=256; sft_len=768; batch=8; lr=2e-3
fi
start=$(date +%s)
rm -rf "$out"
mkdir -p "$out"

echo "== 1. extend llama2 with Chinese pieces"
"$py" -m encoder.tokenizer extend --base "$shared/tokenizers/llama2" \
    --data_loader_path encoder/user_data_loader/text.py \
    --data_loader_args "path=$shared/data/zh_xiyouji.txt" split=line \
    --vocab_size "$vocab" --output "$out/tokenizer_zh"

echo "== 2. tiny Llama base (llama2 vocabulary)"
"$py" run_scripts/tiny_model.py --tokenizer "$shared/tokenizers/llama2" --output "$out/base" \
    --max_positions 1024

echo "== 3. encode the book with the extended tokenizer"
"$py" encoder/main.py --tokenizer_path "$out/tokenizer_zh" \
    --data_loader_path encoder/user_data_loader/text.py \
    --data_loader_args "path=$shared/data/zh_xiyouji.txt" split=line \
    --corpus_name zh_pretrain --encode_type pretrain --output_path "$out/data" \
    --max_length "$max_len" --merge_data

echo "== 4. continued pretraining: LoRA + new rows"
"$py" trainer/train.py --model_path "$out/base" --tokenizer_path "$out/tokenizer_zh" \
    --data_path "$out/data/zh_pretrain" --output_path "$out/runs" --save_name pretrain \
    --no_timestamp --use_lora --max_steps "$pt_steps" --micro_batch_size "$batch" \
    --learning_rate "$lr" --lr_scheduler cosine --logging_steps 10

echo "== 5. merge"
"$py" -m trainer.export --checkpoint "$out/runs/pretrain" --output "$out/model_pretrained"

echo "== 6. SFT on alpaca_zh (LoRA)"
"$py" encoder/main.py --tokenizer_path "$out/model_pretrained" \
    --data_loader_path encoder/user_data_loader/alpaca.py \
    --data_loader_args "path=$shared/data/alpaca_zh_demo.json" \
    --corpus_name alpaca_zh --encode_type qa --template alpaca --output_path "$out/data" \
    --max_length "$sft_len" --merge_data
"$py" trainer/train.py --model_path "$out/model_pretrained" --data_path "$out/data/alpaca_zh" \
    --output_path "$out/runs" --save_name sft --no_timestamp --use_lora \
    --max_steps "$sft_steps" --micro_batch_size "$batch" --learning_rate "$lr" --logging_steps 10

echo "== 7. merge"
"$py" -m trainer.export --checkpoint "$out/runs/sft" --output "$out/model_sft"

echo "== 8. generate"
"$py" -m trainer.generate --model "$out/model_sft" --prompt "孙悟空是谁？" --max_new_tokens 32
echo "extend_vocab: done in $(( $(date +%s) - start ))s -> $out"
