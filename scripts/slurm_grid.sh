#!/usr/bin/env bash
# The paper's comparison as a SLURM array job: models x init methods x learning rates, one run per
# array task (one GPU each), then the evaluation of every extended model against its original.
#
#   bash   scripts/slurm_grid.sh list        # print the grid: task id, model, method, lr, output dir
#   bash   scripts/slurm_grid.sh submit      # sbatch the array (--array=0-<N-1>) and, after it, the evaluation
#   sbatch --array=0-7 scripts/slurm_grid.sh # the same array by hand (N from `list`)
#   bash   scripts/slurm_grid.sh evaluate    # evaluation + summary of the finished runs
#   bash   scripts/slurm_grid.sh             # no SLURM (or no --array): every task in turn, then evaluate
#
# Methods without training (UNTRAINED_METHODS) run once per model, not once per learning rate.
# Each task passes --resume and --checkpoint_every, so a pre-empted task continues when requeued;
# a task whose report.json exists is skipped. The evaluation step calls
#   python -m token_distillation.evaluate --model_path ORIGINAL --extended_paths DIR1,DIR2,...
#          --dataset_path EVAL_DATASET_PATH --out_path RESULTS_DIR/eval/<model>
# once per model, and is skipped with a message when that module is not installed. A summary of the
# runs' own reports (held-out distillation loss before/after, steps, seconds) is always written to
# RESULTS_DIR/summary.tsv.
#
# Variables (default):
#   REPO_DIR          repository root ($SLURM_SUBMIT_DIR under SLURM, else the parent of scripts/)
#   PYTHON            interpreter ($REPO_DIR/.venv/bin/python if present, else python3)
#   MODELS            space-separated models: hub ids, directories, .gguf files or aliases
#                     ("smollm2-135m gemma3-270m")
#   INIT_METHODS      space-separated --init_method values ("random subtoken-mean token_distillation")
#   UNTRAINED_METHODS methods that ignore the learning rate ("random subtoken-mean weighted-mean")
#   LRS               space-separated learning rates for trained methods ("1e-4 1e-3"): AdamW lr of
#                     --recipe paper, or --token_distillation_lr_relative with RECIPE=per-token
#   RECIPE            training recipe, paper (default here: the paper's comparison) or per-token
#   NEW_TOKENS        word list (new_tokens/biomedical_demo.txt)
#   DATASET_PATH      training corpus ($REPO_DIR/../shared/data/pubmed_abstracts/abstracts.jsonl when
#                     present, else empty = generated snippets)
#   EVAL_DATASET_PATH corpus for the evaluation (DATASET_PATH)
#   RESULTS_DIR       where runs, evaluation and summary go (outputs/grid)
#   BATCH_SIZE, EPOCHS, SNIPPET_NUM, SNIPPET_LEN, TARGET_LAYER, SEED
#                     as in slurm_single_gpu.sh (16, 0 = the recipe's default, 25, 50, -1, 42)
#   CHECKPOINT_EVERY  --checkpoint_every (20)
#   EXTRA_ARGS        further flags for every run ("": set the flags above through their variables; a flag
#                     given twice is refused)
#   TASK_ID           run only this task (${SLURM_ARRAY_TASK_ID}; unset: all tasks in turn)
#
#SBATCH --job-name=tokdist-grid
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@60
#SBATCH --open-mode=append
#SBATCH --output=tokdist-grid-%A_%a.out
set -euo pipefail

REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
RECIPE=${RECIPE:-paper}  # this grid reproduces the paper's comparison
DEFAULT_DATASET=${DEFAULT_DATASET:-../shared/data/pubmed_abstracts/abstracts.jsonl}
source "$REPO_DIR/scripts/common.sh"
MODELS=${MODELS:-"smollm2-135m gemma3-270m"}
INIT_METHODS=${INIT_METHODS:-"random subtoken-mean token_distillation"}
UNTRAINED_METHODS=${UNTRAINED_METHODS:-"random subtoken-mean weighted-mean"}
LRS=${LRS:-"1e-4 1e-3"}
EVAL_DATASET_PATH=${EVAL_DATASET_PATH:-$DATASET_PATH}
RESULTS_DIR=${RESULTS_DIR:-outputs/grid}
TASK_ID=${TASK_ID:-${SLURM_ARRAY_TASK_ID:-}}

slug() { basename "${1%/}" | tr -c 'A-Za-z0-9._\n-' '_'; }

# The grid, one task per line: model<TAB>method<TAB>lr ("-" for methods without training)<TAB>out dir
grid() {
    local model method lr
    for model in $MODELS; do
        for method in $INIT_METHODS; do
            if [[ " $UNTRAINED_METHODS " == *" $method "* ]]; then
                printf '%s\t%s\t-\t%s\n' "$model" "$method" "$RESULTS_DIR/runs/$(slug "$model")/$method"
            else
                for lr in $LRS; do
                    printf '%s\t%s\t%s\t%s\n' "$model" "$method" "$lr" "$RESULTS_DIR/runs/$(slug "$model")/${method}_lr$lr"
                done
            fi
        done
    done
}

run_task() {
    local line model method lr out
    line=$(grid | sed -n "$(($1 + 1))p")
    if [[ -z "$line" ]]; then
        echo "task $1: no such task (the grid has $(grid | wc -l) tasks; see: bash $0 list)" >&2
        return 2
    fi
    IFS=$'\t' read -r model method lr out <<<"$line"
    if [[ -f "$out/report.json" ]]; then
        echo "task $1: already done ($out/report.json)"
        return 0
    fi
    echo "[$(date '+%F %T')] task $1: $model $method lr=$lr -> $out"
    local args=(--model_path "$model" --new_tokens_source "$NEW_TOKENS" --out_path "$out" --init_method "$method"
                --token_distillation_batch_size "$BATCH_SIZE" --token_distillation_epochs "$EPOCHS"
                --snippet_num "$SNIPPET_NUM" --snippet_len "$SNIPPET_LEN" "--target_layer=$TARGET_LAYER"
                --seed "$SEED" --checkpoint_every "$CHECKPOINT_EVERY" --resume)
    args+=(--recipe "$RECIPE")
    if [[ "$lr" != "-" ]]; then
        if [[ "$RECIPE" == "per-token" ]]; then args+=(--token_distillation_lr_relative "$lr")
        else args+=(--token_distillation_lr "$lr"); fi
    fi
    [[ -n "$DATASET_PATH" ]] && args+=(--dataset_path "$DATASET_PATH")
    # shellcheck disable=SC2086  # EXTRA_ARGS is split into flags on purpose
    run_with_signals "$PYTHON" apply_embedding_init.py "${args[@]}" $EXTRA_ARGS
}

summarize() {
    "$PYTHON" - "$RESULTS_DIR" <<'PY'
import json, sys
from pathlib import Path
root = Path(sys.argv[1])
rows = ["model\tinit_method\tlr\ttokens\theldout_loss_init\theldout_loss_final\tmean_row_norm\tsteps\tseconds\tout_path"]
for rep in sorted(root.glob("runs/*/*/report.json")):
    r = json.loads(rep.read_text())
    c = r["config"]
    lr = c["token_distillation_lr"] if r["train_steps"] else "-"
    f = lambda x: "nan" if x is None else f"{x:.6g}"
    rows.append("\t".join(map(str, [c["model_path"], c["init_method"], lr, len(r["tokens"]),
                                     f(r["mean_heldout_loss_init"]), f(r["mean_heldout_loss_final"]),
                                     f(r["mean_new_row_norm"]), r["train_steps"], f(r["train_seconds"]), rep.parent])))
(root / "summary.tsv").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
print(f"\nwrote {root / 'summary.tsv'} ({len(rows) - 1} runs)")
PY
}

evaluate() {
    mkdir -p "$RESULTS_DIR"
    summarize
    if ! "$PYTHON" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("token_distillation.evaluate") is None)' 2>/dev/null; then
        echo "evaluation skipped: the module token_distillation.evaluate is not installed in this checkout"
        return 0
    fi
    if [[ -z "$EVAL_DATASET_PATH" ]]; then
        echo "evaluation skipped: no EVAL_DATASET_PATH (or DATASET_PATH) corpus given"
        return 0
    fi
    local model dirs
    for model in $MODELS; do
        dirs=$(grid | awk -F'\t' -v m="$model" '$1 == m {print $4}' | while read -r d; do
            [[ -f "$d/report.json" ]] && echo "$d"; done | paste -sd, -)
        if [[ -z "$dirs" ]]; then echo "evaluation: no finished run for $model"; continue; fi
        echo "[$(date '+%F %T')] evaluate $model: $dirs"
        "$PYTHON" -m token_distillation.evaluate --model_path "$model" --extended_paths "$dirs" \
            --dataset_path "$EVAL_DATASET_PATH" --out_path "$RESULTS_DIR/eval/$(slug "$model")"
    done
}

case "${1:-}" in
    list)
        grid | awk -F'\t' '{printf "%d\t%s\n", NR - 1, $0}'
        ;;
    submit)
        n=$(grid | wc -l)
        job=$(sbatch --parsable --array=0-$((n - 1)) "$0")
        echo "submitted array job $job ($n tasks)"
        ev=$(sbatch --parsable --dependency=afterok:"$job" --gres=gpu:1 --job-name=tokdist-grid-eval \
             --output=tokdist-grid-eval-%j.out --wrap "bash $REPO_DIR/scripts/slurm_grid.sh evaluate")
        echo "submitted evaluation job $ev (runs after $job succeeds)"
        ;;
    evaluate)
        evaluate
        ;;
    "")
        if [[ -n "$TASK_ID" ]]; then
            run_task "$TASK_ID"
        else
            n=$(grid | wc -l)
            for ((i = 0; i < n; i++)); do run_task "$i"; done
            evaluate
        fi
        ;;
    *)
        echo "usage: bash $0 [list|submit|evaluate]   (see the top of this file)" >&2
        exit 2
        ;;
esac
