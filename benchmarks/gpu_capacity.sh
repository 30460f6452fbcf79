#!/usr/bin/env bash
# How the GPU capacity figures in the README were made, on the GPU machine (one H200), from the
# project root after ../shared/gpu/README.md's transfers:
#
#   bash benchmarks/gpu_capacity.sh setup            # install vLLM 0.26 into /tmp/site, start CUDA MPS
#   bash benchmarks/gpu_capacity.sh smoke            # scripts/gpu_smoke on the real-dims dummy model
#   bash benchmarks/gpu_capacity.sh pool N KV LEVELS [ARGS] # voxphone's vllm engine, N engines, KV bytes each
#   bash benchmarks/gpu_capacity.sh local LEVELS [ARGS]     # the old in-process AsyncLLM
#   bash benchmarks/gpu_capacity.sh remote LEVELS [ARGS]    # vllm serve through voxphone's vllm-remote
#
# ARGS go to gpu_capacity.py, e.g. --kv-cache-dtype fp8 --profile-at 256 --long 64; TAG=x names
# the result file gpu_capacity-poolN-x.json.
# Results (JSON) go to $OUT (the device tool's output folder) or benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export PYTHONPATH=/tmp/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
export VLLM_DISABLE_COMPILE_CACHE=1  # the model card's advice
export VLLM_LOG_STATS_INTERVAL=${VLLM_LOG_STATS_INTERVAL:-5}  # KV cache usage, sampled per level
# CUDA MPS lets several engine processes' kernels run at once instead of taking turns.
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
model=/tmp/voxtral-dummy
case "$1" in
  setup)
    bash /tmp/gpu/install.sh
    mkdir -p /tmp/mps /tmp/mps-log
    pgrep -x nvidia-cuda-mps >/dev/null || nvidia-cuda-mps-control -d
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader ;;
  smoke)
    CALLS=4 scripts/gpu_smoke "$model" ;;
  pool)
    python3 benchmarks/gpu_capacity.py --path pool --engines "$2" --kv-cache-memory-bytes "$3" \
      --levels "$4" --model "$model" --out "$out/gpu_capacity-pool$2${TAG:+-$TAG}.json" "${@:5}" ;;
  local)
    python3 benchmarks/gpu_capacity.py --path local --levels "$2" --model "$model" \
      --out "$out/gpu_capacity-local.json" "${@:3}" ;;
  remote)
    python3 benchmarks/gpu_capacity.py --path remote --start-server --levels "$2" --model "$model" \
      --out "$out/gpu_capacity-remote${TAG:+-$TAG}.json" "${@:3}" ;;
esac
