#!/usr/bin/env bash
# Token Distillation for one model over several GPUs of one node (or several nodes; see also
# slurm_multi_node.sh). One process per GPU, started by torchrun (default) or `accelerate launch`;
# the code is the same as for one process. RECIPE=per-token (default) shards the tokens: each
# process trains its own tokens with no communication per step, and the rows are gathered at the
# end; RECIPE=paper splits each optimizer step's global batch (--token_distillation_batch_size)
# over the processes and all-reduces the gradient. Either way the result equals a one-process run
# with the same flags (up to float rounding). A token-sharded run resumes with the same number of
# processes.
#
#   sbatch scripts/slurm_multi_gpu.sh                       # one node, 4 GPUs (see #SBATCH below)
#   sbatch --nodes=2 scripts/slurm_multi_gpu.sh             # two nodes (torchrun rendezvous)
#   bash   scripts/slurm_multi_gpu.sh                       # no SLURM: all local GPUs, or 2 CPU processes
#
# Variables (default):
#   REPO_DIR          repository root ($SLURM_SUBMIT_DIR under SLURM, else the parent of scripts/)
#   PYTHON            interpreter ($REPO_DIR/.venv/bin/python if present, else python3)
#   LAUNCHER          torchrun or accelerate (torchrun; accelerate is single-node here)
#   NPROC             processes per node ($SLURM_GPUS_ON_NODE, else the number of visible GPUs,
#                     else 2 CPU processes with the gloo backend); with RECIPE=paper it must divide BATCH_SIZE
#   NNODES            nodes ($SLURM_NNODES, else 1); with > 1, one torchrun per node via srun
#   MASTER_PORT       rendezvous port (29500 + the job id modulo 1000 under SLURM, else 29500)
#   MODEL_PATH        hub id, checkpoint directory, .gguf file or bundled alias (smollm2-135m)
#   NEW_TOKENS        word list (new_tokens/biomedical_demo.txt)
#   DATASET_PATH      corpus ($REPO_DIR/../shared/data/pubmed_abstracts/abstracts_small.jsonl when present,
#                     else empty = generated snippets)
#   OUT_PATH          output directory (outputs/multi_gpu_<model>)
#   RECIPE            --recipe: per-token (default) or paper (then LR is the AdamW lr)
#   LR, BATCH_SIZE, EPOCHS, SNIPPET_NUM, SNIPPET_LEN, TARGET_LAYER, SEED
#                     as in slurm_single_gpu.sh (1e-4, 16 = the global batch, 0 = the recipe's default, 25, 50, -1, 42)
#   CHECKPOINT_EVERY  --checkpoint_every (20); --resume is always passed (requeue continues)
#   PG_TIMEOUT_MIN    --process_group_timeout_minutes (60): the limit of one collective transfer; waits
#                     for a slower process (mining, generation, saving, a larger shard) do not count
#   EXTRA_ARGS        further flags, passed as they are ("": set the flags above through their variables;
#                     a flag given twice is refused)
#
#SBATCH --job-name=tokdist-multigpu
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=32
#SBATCH --mem=256G
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@60
#SBATCH --open-mode=append
#SBATCH --output=tokdist-multigpu-%j.out
set -euo pipefail

REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
source "$REPO_DIR/scripts/common.sh"
LAUNCHER=${LAUNCHER:-torchrun}
if [[ -z "${NPROC:-}" ]]; then
    NPROC=${SLURM_GPUS_ON_NODE:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')}
    [[ "$NPROC" -ge 1 ]] 2>/dev/null || NPROC=2
fi
NNODES=${NNODES:-${SLURM_NNODES:-1}}
MASTER_PORT=${MASTER_PORT:-$((29500 + ${SLURM_JOB_ID:-0} % 1000))}
MODEL_PATH=${MODEL_PATH:-smollm2-135m}
OUT_PATH=${OUT_PATH:-outputs/multi_gpu_$(basename "${MODEL_PATH%/}" | tr -c 'A-Za-z0-9._\n-' '_')}

exit_if_done "$OUT_PATH"
WORLD=$((NPROC * NNODES))
if [[ "$RECIPE" == paper && "$BATCH_SIZE" != auto ]] && ((BATCH_SIZE % WORLD)); then
    echo "error: BATCH_SIZE=$BATCH_SIZE (the global batch of RECIPE=paper) must be a multiple of $WORLD processes" >&2
    exit 2
fi

ARGS=(--model_path "$MODEL_PATH" --new_tokens_source "$NEW_TOKENS" --out_path "$OUT_PATH"
      --init_method token_distillation --loss_method MSE-on-hiddens
      --recipe "$RECIPE" --token_distillation_lr "$LR" --token_distillation_batch_size "$BATCH_SIZE"
      --token_distillation_epochs "$EPOCHS" --snippet_num "$SNIPPET_NUM" --snippet_len "$SNIPPET_LEN"
      "--target_layer=$TARGET_LAYER" --seed "$SEED" --checkpoint_every "$CHECKPOINT_EVERY" --resume
      --process_group_timeout_minutes "${PG_TIMEOUT_MIN:-60}")
[[ -n "$DATASET_PATH" ]] && ARGS+=(--dataset_path "$DATASET_PATH")
# shellcheck disable=SC2206  # EXTRA_ARGS is split into flags on purpose
ARGS+=($EXTRA_ARGS)

echo "[$(date '+%F %T')] job ${SLURM_JOB_ID:-local}: $MODEL_PATH -> $OUT_PATH, $NNODES node(s) x $NPROC process(es), $LAUNCHER"
if [[ "$LAUNCHER" == accelerate ]]; then
    if ((NNODES > 1)); then echo "error: LAUNCHER=accelerate is single-node in this script; use torchrun" >&2; exit 2; fi
    # --multi_gpu also covers several CPU processes (gloo) when no GPU is visible
    FORWARD_AS=TERM run_with_signals "$PYTHON" -m accelerate.commands.launch --multi_gpu --num_processes "$NPROC" --num_machines 1 \
        --main_process_port "$MASTER_PORT" --mixed_precision no --dynamo_backend no \
        apply_embedding_init.py "${ARGS[@]}"
elif ((NNODES > 1)); then
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    FORWARD_AS=TERM run_with_signals srun --ntasks-per-node=1 --ntasks="$NNODES" "$PYTHON" -m torch.distributed.run \
        --nnodes "$NNODES" --nproc_per_node "$NPROC" --rdzv_id "${SLURM_JOB_ID:-0}" \
        --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" \
        apply_embedding_init.py "${ARGS[@]}"
else
    FORWARD_AS=TERM run_with_signals "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" apply_embedding_init.py "${ARGS[@]}"
fi
echo "[$(date '+%F %T')] done: $OUT_PATH"
