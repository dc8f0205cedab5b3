#!/usr/bin/env bash
# GPU check for a machine with an NVIDIA GPU: speed and peak GPU memory of an 8B-shaped run, with
# the memory plan's estimate beside it. Nothing is downloaded (HF_HUB_OFFLINE=1).
#
#   bash scripts/gpu_check.sh                      # Llama-3.1-8B shape (32 layers, bf16), 40 tokens x 25 snippets
#   bash scripts/gpu_check.sh --batch_size auto    # extra flags go to scripts/gpu_check.py (see its --help)
#
# Builds a random model of Llama-3.1-8B's shape on the GPU, saves it (bf16, ~15 GiB) with the real
# tokenizer of the bundled SmolLM2 model into a temporary directory (WORK_DIR to choose one: it must
# be new or empty and hold two such checkpoints), runs the whole pipeline on it in one process and
# prints, labelled: training seconds per 1,000 new tokens at 25 snippets per token (extrapolated
# linearly from the 40 tokens trained), the whole run's seconds, torch.cuda.max_memory_allocated and
# the memory plan. A few minutes on an H200. Writes the JSON result to OUT (outputs/gpu_check.json).
#
# With more than one GPU it then times 1 process against one per GPU (scripts/benchmark_processes.py,
# JSON to PROC_OUT, outputs/gpu_processes.json).
# Variables: PYTHON (default .venv/bin/python, else python3), WORK_DIR, OUT, PROC_OUT.
# Without a CUDA device it stops with exit code 2 and one "error:" line before building anything.
set -euo pipefail
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_DIR"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
args=(--out "${OUT:-outputs/gpu_check.json}")
[[ -n "${WORK_DIR:-}" ]] && args+=(--work_dir "$WORK_DIR")
"$PYTHON" scripts/gpu_check.py "${args[@]}" "$@"
# several GPUs: the token-sharding comparison, 1 process against one per GPU (issue: near-linear speed-up)
ngpu=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU" || true)
if [[ "${ngpu:-0}" -gt 1 ]]; then
    "$PYTHON" scripts/benchmark_processes.py --device cuda --processes "1,$ngpu" --threads 4 \
        --out "${PROC_OUT:-outputs/gpu_processes.json}"
fi
