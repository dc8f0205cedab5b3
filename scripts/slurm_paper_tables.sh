#!/usr/bin/env bash
# The paper's grid end to end: methods x models (scripts/slurm_grid.sh trains every extended model),
# then both of the paper's tables per model: benchmark accuracy with the new tokens
# (scripts/eval_benchmarks.py) and definitions judged by a model (scripts/judge_definitions.py).
#
#   bash   scripts/slurm_paper_tables.sh list      # the grid (as slurm_grid.sh list)
#   bash   scripts/slurm_paper_tables.sh submit    # sbatch the grid's array, then the tables job after it
#   bash   scripts/slurm_paper_tables.sh tables    # both tables from the finished runs (this job's work)
#   bash   scripts/slurm_paper_tables.sh           # no SLURM: every grid task in turn, then the tables
#
# The tables of model M go to $TABLES_DIR/<M>/benchmarks/ and $TABLES_DIR/<M>/judge/; each lists the
# original model and every finished run of M (a directory with report.json), labelled
# <method> or <method>_lr<lr>. Both scripts rerun into their own earlier output.
#
# Variables (default), besides those of slurm_grid.sh (MODELS, INIT_METHODS, LRS, RECIPE, NEW_TOKENS,
# DATASET_PATH, RESULTS_DIR, ...), which this script passes on:
#   TASKS          comma-separated lm-eval tasks ("": the biomedical tasks the installed lm-eval has:
#                  pubmedqa, medmcqa, medqa_4options and the medical MMLU subsets; they download their data)
#   INCLUDE_PATH   folders of local lm-eval task YAML ("")
#   PUBMEDQA_DIR   PubMedQA's expert-labelled files, adds the task pubmedqa_local ("")
#   NUM_FEWSHOT    few-shot examples (0), LIMIT: documents per task (0 = all), BENCH_BATCH_SIZE (8)
#   JUDGE_MODEL    the judge (meta-llama/Llama-3.1-70B-Instruct; any causal LM the tool loads)
#   JUDGE_BACKEND  auto (vLLM when installed), transformers or vllm
#   MAX_WORDS      words judged per model (0 = all), DEFINITION_TOKENS (32), DTYPE (bfloat16)
#   TABLES_DIR     where the tables go ($RESULTS_DIR/tables)
#   TABLES_GPUS    GPUs of the tables job (4: a 70B judge in bf16 needs ~140 GB)
#
#SBATCH --job-name=tokdist-tables
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=16
#SBATCH --mem=256G
#SBATCH --time=12:00:00
#SBATCH --output=tokdist-tables-%j.out
set -euo pipefail

REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
export REPO_DIR
GRID="$REPO_DIR/scripts/slurm_grid.sh"
RESULTS_DIR=${RESULTS_DIR:-outputs/grid}
export RESULTS_DIR
TASKS=${TASKS:-}
INCLUDE_PATH=${INCLUDE_PATH:-}
PUBMEDQA_DIR=${PUBMEDQA_DIR:-}
NUM_FEWSHOT=${NUM_FEWSHOT:-0}
LIMIT=${LIMIT:-0}
BENCH_BATCH_SIZE=${BENCH_BATCH_SIZE:-8}
JUDGE_MODEL=${JUDGE_MODEL:-meta-llama/Llama-3.1-70B-Instruct}
JUDGE_BACKEND=${JUDGE_BACKEND:-auto}
MAX_WORDS=${MAX_WORDS:-0}
DEFINITION_TOKENS=${DEFINITION_TOKENS:-32}
DTYPE=${DTYPE:-bfloat16}
TABLES_DIR=${TABLES_DIR:-$RESULTS_DIR/tables}
TABLES_GPUS=${TABLES_GPUS:-4}
cd "$REPO_DIR"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

# finished runs of model $1 as "dir<TAB>label" lines (label: method, or method_lr<lr> for trained ones)
finished_runs() {
    bash "$GRID" list | awk -F'\t' -v m="$1" '$2 == m {print $5 "\t" ($4 == "-" ? $3 : $3 "_lr" $4)}' |
        while IFS=$'\t' read -r dir label; do
            if [[ -f "$dir/report.json" ]]; then printf '%s\t%s\n' "$dir" "$label"; fi
        done
}

tables() {
    local model runs dirs labels slug out
    for model in ${MODELS:-smollm2-135m gemma3-270m}; do
        runs=$(finished_runs "$model")
        if [[ -z "$runs" ]]; then echo "tables: no finished run for $model"; continue; fi
        dirs=$(cut -f1 <<<"$runs" | paste -sd, -)
        labels=$(cut -f2 <<<"$runs" | paste -sd, -)
        slug=$(basename "${model%/}" | tr -c 'A-Za-z0-9._\n-' '_')
        out="$TABLES_DIR/$slug"
        echo "[$(date '+%F %T')] tables for $model: $labels"
        local bench=(--model_path "$model" --extended_paths "$dirs" --labels "$labels" --num_fewshot "$NUM_FEWSHOT"
                     --limit "$LIMIT" --batch_size "$BENCH_BATCH_SIZE" --dtype "$DTYPE" --out_dir "$out/benchmarks")
        [[ -n "$TASKS" ]] && bench+=(--tasks "$TASKS")
        [[ -n "$INCLUDE_PATH" ]] && bench+=(--include_path "$INCLUDE_PATH")
        [[ -n "$PUBMEDQA_DIR" ]] && bench+=(--pubmedqa_dir "$PUBMEDQA_DIR")
        "$PYTHON" scripts/eval_benchmarks.py "${bench[@]}"
        "$PYTHON" scripts/judge_definitions.py --model_path "$model" --extended_paths "$dirs" --labels "$labels" \
            --judge_model "$JUDGE_MODEL" --judge_backend "$JUDGE_BACKEND" --max_words "$MAX_WORDS" \
            --definition_tokens "$DEFINITION_TOKENS" --dtype "$DTYPE" --out_dir "$out/judge"
    done
    echo "tables written under $TABLES_DIR/<model>/{benchmarks,judge}/"
}

case "${1:-}" in
    list)
        bash "$GRID" list
        ;;
    submit)
        n=$(bash "$GRID" list | wc -l)
        job=$(sbatch --parsable --array=0-$((n - 1)) "$GRID")
        echo "submitted the grid: array job $job ($n tasks)"
        tj=$(sbatch --parsable --dependency=afterok:"$job" --gres=gpu:"$TABLES_GPUS" \
             "$REPO_DIR/scripts/slurm_paper_tables.sh" tables)
        echo "submitted the tables job $tj (runs after $job succeeds)"
        ;;
    tables)
        tables
        ;;
    "")
        bash "$GRID"
        tables
        ;;
    *)
        echo "usage: bash $0 [list|submit|tables]   (see the top of this file)" >&2
        exit 2
        ;;
esac
