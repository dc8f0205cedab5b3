# Shared set-up of the SLURM scripts (sourced, not run): repository root, interpreter and the
# training defaults. A variable already set in the environment (or by the sourcing script) wins.
# The sourcing script sets REPO_DIR first ($SLURM_SUBMIT_DIR under SLURM: sbatch runs a copy of the
# script from a spool directory, so the script's own location is not the repository) and, if its
# default corpus differs, DEFAULT_DATASET.

cd "$REPO_DIR"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
NEW_TOKENS=${NEW_TOKENS:-new_tokens/biomedical_demo.txt}
DEFAULT_DATASET=${DEFAULT_DATASET:-../shared/data/pubmed_abstracts/abstracts_small.jsonl}
if [[ -z "${DATASET_PATH+x}" ]]; then  # unset: the shared corpus when present, else generated snippets
    DATASET_PATH=""
    [[ -f "$DEFAULT_DATASET" ]] && DATASET_PATH=$DEFAULT_DATASET
fi
LR=${LR:-1e-4}
RECIPE=${RECIPE:-per-token}
BATCH_SIZE=${BATCH_SIZE:-16}
EPOCHS=${EPOCHS:-0}  # 0: the recipe's default (per-token 2, paper 1)
SNIPPET_NUM=${SNIPPET_NUM:-25}
SNIPPET_LEN=${SNIPPET_LEN:-50}
TARGET_LAYER=${TARGET_LAYER:-"-1"}
SEED=${SEED:-42}
CHECKPOINT_EVERY=${CHECKPOINT_EVERY:-20}
EXTRA_ARGS=${EXTRA_ARGS:-}
export PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"

# exit 0 with a message when the run in $1 has already finished (the tool's manifest says it holds a
# model: a run whose save failed holds only its trained rows, see token_distillation/rescue.py)
exit_if_done() {
    if [[ -f "$1/report.json" ]] && grep -q '"kind": "model"' "$1/token_distillation_output.json" 2>/dev/null; then
        echo "already done: $1 holds a finished model (remove $1 or set OUT_PATH to run again)"
        exit 0
    fi
}

# Run a command so that a stop reaches it: SLURM's pre-termination signal (#SBATCH --signal=B:USR1@60
# signals this batch shell only) and SIGTERM are forwarded to the command, as USR1 / TERM, or both
# as $FORWARD_AS when set (TERM for launchers such as torchrun, which pass SIGTERM on to their
# workers). The tool then checkpoints its current step and exits 128 + the signal number. With
# REQUEUE_ON_USR1=1 under SLURM, a run stopped by USR1 (exit 138: the time limit is near) requeues
# the job, which resumes from the checkpoint (the scripts pass --resume). Returns the command's code.
run_with_signals() {
    "$@" &
    local pid=$! rc=0
    trap 'kill -"${FORWARD_AS:-USR1}" "$pid" 2>/dev/null || true' USR1
    trap 'kill -"${FORWARD_AS:-TERM}" "$pid" 2>/dev/null || true' TERM
    while :; do
        wait "$pid" && rc=0 || rc=$?
        kill -0 "$pid" 2>/dev/null || break  # still running: wait was cut short by a forwarded signal
    done
    trap - USR1 TERM
    if [[ "$rc" == 138 && "${REQUEUE_ON_USR1:-1}" == 1 && -n "${SLURM_JOB_ID:-}" ]]; then
        echo "[$(date '+%F %T')] stopped before the time limit with a checkpoint; requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID" || true
    fi
    return "$rc"
}
