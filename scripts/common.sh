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

# exit 0 with a message when the run in $1 has already finished (its report.json exists)
exit_if_done() {
    if [[ -f "$1/report.json" ]]; then
        echo "already done: $1/report.json exists (remove $1 or set OUT_PATH to run again)"
        exit 0
    fi
}
