#!/usr/bin/env bash
# Encode a corpus on a Slurm cluster: an array job with one task per part, and a merge job that
# starts when every task succeeded. Edit the variables, then: bash run_scripts/encode_slurm.sh
#   DRY_RUN=1 bash run_scripts/encode_slurm.sh     prints the two sbatch commands, submits nothing
# A task whose part is already complete (its manifest exists) exits at once, so after a failure
# just run this script again: only the missing parts are encoded, then the merge runs.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# ---- edit these -----------------------------------------------------------------------------
# (each can also be given in the environment: NUM_PARTS=64 bash run_scripts/encode_slurm.sh)
TOKENIZER="${TOKENIZER:-../shared/tokenizers/llama2}"  # any Hugging Face tokenizer directory
PLUGIN="${PLUGIN:-encoder/user_data_loader/text.py}"  # a part-aware plugin reads only its part
PLUGIN_ARGS="${PLUGIN_ARGS:-path=../shared/data/c4_demo.jsonl}"  # key=value pairs (s3://... and globs too)
ENCODE_TYPE="${ENCODE_TYPE:-pretrain}"                # pretrain | qa | chat
TEMPLATE="${TEMPLATE:-}"                              # qa/chat: none | chat | alpaca | chatml | llama2
CORPUS="${CORPUS:-c4}"
OUTPUT="${OUTPUT:-out}"                               # on a filesystem every node mounts here
MAX_LENGTH="${MAX_LENGTH:-2048}"
NUM_PARTS="${NUM_PARTS:-8}"                           # more parts than nodes: balance + cheap retries
MAX_PARALLEL="${MAX_PARALLEL:-64}"                    # array tasks running at once (%N)
CPUS_PER_TASK="${CPUS_PER_TASK:-2}"                   # = the encoder's --num_workers per part
PARTITION="${PARTITION:-}"                            # empty: the cluster's default partition
TIME_LIMIT="${TIME_LIMIT:-04:00:00}"                          # per part
PYTHON="${PYTHON:-$root/.venv/bin/python}"
# ----------------------------------------------------------------------------------------------

LOGS="$OUTPUT/$CORPUS.slurm-logs"
template=()
if [ -n "$TEMPLATE" ]; then template=(--template "$TEMPLATE"); fi
partition=()
if [ -n "$PARTITION" ]; then partition=(--partition="$PARTITION"); fi
# shellcheck disable=SC2206  # PLUGIN_ARGS holds several key=value words
flags=(--tokenizer_path "$TOKENIZER" --data_loader_path "$PLUGIN" --data_loader_args $PLUGIN_ARGS
       --encode_type "$ENCODE_TYPE" "${template[@]}" --max_length "$MAX_LENGTH"
       --output_path "$OUTPUT" --corpus_name "$CORPUS" --num_workers "$CPUS_PER_TASK")
quoted="$(printf '%q ' "${flags[@]}")"

# 1. One array task per part: part $SLURM_ARRAY_TASK_ID, written to OUTPUT/CORPUS.parts/JOB/part-I-of-N
#    (an attempt directory renamed into place when complete). --requeue: a task on a failed node
#    is run again by Slurm.
part_cmd="cd $(printf '%q' "$root") && $(printf '%q' "$PYTHON") -m encoder.distributed --engine local \
--num_parts $NUM_PARTS --only_parts \$SLURM_ARRAY_TASK_ID $quoted"
array=(sbatch --parsable --job-name="encode-$CORPUS" --array="0-$((NUM_PARTS - 1))%$MAX_PARALLEL"
       --cpus-per-task="$CPUS_PER_TASK" --time="$TIME_LIMIT" --requeue --output="$LOGS/part-%a.log"
       "${partition[@]}" --wrap="$part_cmd")

# 2. The merge, after every array task exited 0 (afterok): OUTPUT/CORPUS/manifest.json pointing
#    into the parts (no token is copied), or a list of the parts still missing.
merge_cmd="cd $(printf '%q' "$root") && $(printf '%q' "$PYTHON") -m encoder.distributed --engine local \
--num_parts $NUM_PARTS --merge_only $quoted"

if [ "${DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "${array[@]}"; echo
    array_id=ARRAY_JOB_ID
else
    mkdir -p "$LOGS"
    array_id="$("${array[@]}")"
    echo "submitted array job $array_id ($NUM_PARTS parts); logs in $LOGS"
fi
merge=(sbatch --parsable --job-name="merge-$CORPUS" --dependency="afterok:${array_id%%;*}"
       --time=00:30:00 --output="$LOGS/merge.log" "${partition[@]}" --wrap="$merge_cmd")
if [ "${DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "${merge[@]}"; echo
else
    echo "submitted merge job $("${merge[@]}") (runs after every part succeeded)"
fi

# 3. When the merge job is done:
#    $PYTHON -m shardfmt inspect "$OUTPUT/$CORPUS" && $PYTHON -m shardfmt verify "$OUTPUT/$CORPUS"
