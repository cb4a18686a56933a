#!/usr/bin/env bash
# The engine on one CUDA GPU, in one go (about 5 minutes; hard limit GPU_CHECK_LIMIT_S, default 470 s):
# load and warm-up phases, greedy answers against transformers' generate, tokens/s at batch 1, 16
# and 64 beside generate_batch, and a forced split between the GPU and host memory.
#
#   bash benchmarks/gpu_check.sh                 # on a GPU machine: torch (CUDA build), transformers,
#                                                # accelerate; no Ray, no network
#   bash benchmarks/gpu_check.sh --cpu-dry-run   # the same steps on CPU with tiny checkpoints
#
# Writes benchmarks/results/gpu_check.json. Exit status: 0 all equal, 1 a greedy answer differs,
# 3 no CUDA device, 124 the time limit ran out.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec timeout --kill-after=10 "${GPU_CHECK_LIMIT_S:-470}" "${PYTHON:-python}" -m benchmarks.gpu_check "$@"
