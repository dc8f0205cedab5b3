#!/usr/bin/env bash
# Token Distillation for one model on several GPU nodes: one torchrun per node (srun), rendezvous
# over the allocated nodes (c10d, on the first node), one process per GPU. With the default
# per-token recipe the tokens are sharded over all processes of all nodes (no communication per
# training step; the rows are gathered once at the end), so thousands of tokens scale with the
# number of GPUs. All settings and variables are those of slurm_multi_gpu.sh, which this script runs.
#
# The one line to edit: the number of nodes (below, `#SBATCH --nodes=2`), or pass it at submission:
#   sbatch --nodes=4 scripts/slurm_multi_node.sh
# with e.g. MODEL_PATH=/models/Llama-3.1-8B DATASET_PATH=/data/corpus.jsonl OUT_PATH=out/llama8b in the
# environment. GPUs per node come from SLURM ($SLURM_GPUS_ON_NODE; keep --gres=gpu:N to your nodes).
# OUT_PATH and the cache (TOKEN_DISTILLATION_CACHE or --cache_dir in EXTRA_ARGS) must be on a file
# system all nodes share: the main process writes the output, every process its own checkpoints.
# Preemption: SLURM's USR1 reaches torchrun on every node, each process checkpoints its own tokens,
# the job requeues and resumes (same number of nodes and GPUs).
#
#SBATCH --job-name=tokdist-multinode
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --time=08:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
#SBATCH --output=tokdist-multinode-%j.out
set -euo pipefail

REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
export REPO_DIR
export NNODES=${NNODES:-${SLURM_NNODES:-1}}
export LAUNCHER=torchrun
export OUT_PATH=${OUT_PATH:-outputs/multi_node_$(basename "${MODEL_PATH:-smollm2-135m}" | tr -c 'A-Za-z0-9._\n-' '_')}
# the same shell process (exec): SLURM's signals reach slurm_multi_gpu.sh's forwarding
exec bash "$REPO_DIR/scripts/slurm_multi_gpu.sh"
