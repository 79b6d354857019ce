#!/usr/bin/env bash
# Runs the GPU acceptance suite on a machine with 2 NVIDIA GPUs where vLLM is importable.
#   bash tests/gpu/run-on-2-gpus.sh [RESULTS_DIR] [pytest args...]
# vLLM staged as wheels in a folder (machines without a registry): set EP_VLLM_SITE to that folder
# (it is put on PYTHONPATH and its bin/ on PATH).
set -euo pipefail
cd "$(dirname "$0")/../.."
results=${1:-gpu-results}; shift || true
if [ -n "${EP_VLLM_SITE:-}" ]; then
  export PYTHONPATH="$EP_VLLM_SITE${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="$EP_VLLM_SITE/bin:$PATH"
fi
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi -L
python3 -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)'
EP_GPU_RESULTS="$results" exec python3 -m pytest -p no:cacheprovider -o addopts="" -m gpu tests/gpu -v -s "$@"
