#!/usr/bin/env bash
# Encode a corpus into token shards. Edit the variables, then: bash run_scripts/encode.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# ---- edit these -----------------------------------------------------------------------------
TOKENIZER=../shared/tokenizers/llama2                 # any Hugging Face tokenizer directory
PLUGIN=encoder/user_data_loader/alpaca.py             # a .py file with a data_loader() generator
PLUGIN_ARGS="path=../shared/data/alpaca_en_demo.json" # key=value pairs passed to data_loader()
ENCODE_TYPE=qa                                        # pretrain | qa | chat
TEMPLATE=alpaca                                       # none | chat | alpaca | chatml | llama2
CORPUS=alpaca                                         # dataset name: OUTPUT/CORPUS/
OUTPUT=out
MAX_LENGTH=2048
WORKERS=1                                             # tokenizer processes (output identical)
# ----------------------------------------------------------------------------------------------

bash run_scripts/setup_venv.sh
source run_scripts/env.sh

# 1. Look at the length distribution first (writes nothing) to choose MAX_LENGTH.
.venv/bin/python encoder/main.py --tokenizer_path "$TOKENIZER" --data_loader_path "$PLUGIN" \
    --data_loader_args $PLUGIN_ARGS --encode_type "$ENCODE_TYPE" --template "$TEMPLATE" \
    --max_length "$MAX_LENGTH" --analyze

# 2. Encode, packing whole samples into MAX_LENGTH sequences (best-fit-decreasing).
.venv/bin/python encoder/main.py --tokenizer_path "$TOKENIZER" --data_loader_path "$PLUGIN" \
    --data_loader_args $PLUGIN_ARGS --encode_type "$ENCODE_TYPE" --template "$TEMPLATE" \
    --corpus_name "$CORPUS" --output_path "$OUTPUT" --max_length "$MAX_LENGTH" \
    --merge_data --num_workers "$WORKERS" --plot

# 3. Check what was written: counts, percentiles, two decoded samples with trained spans marked,
#    then every checksum.
.venv/bin/python -m shardfmt inspect "$OUTPUT/$CORPUS" --show 2
.venv/bin/python -m shardfmt verify "$OUTPUT/$CORPUS"
