#!/usr/bin/env bash
# Runs the one-GPU suite (tests/gpu/test_one_gpu.py) on a machine with an NVIDIA GPU.
#   bash tests/gpu/run-on-1-gpu.sh [RESULTS_DIR] [pytest args...]
# Needs a source cache holding the profiles' DeepEP commits (and patches): EP_GPU_CACHE, default
# .gpu/cache, filled where the sources are reachable by tests/gpu/fill-source-cache.sh and carried here.
# vLLM staged as wheels in a folder (machines without a registry): EP_VLLM_SITE (put on PYTHONPATH, its bin/
# on PATH). A newer NCCL for the `current` profile in its own folder: EP_NCCL_SITE (first on PYTHONPATH).
set -euo pipefail
cd "$(dirname "$0")/../.."
results=${1:-gpu-results}; shift || true
export EP_GPU_CACHE=${EP_GPU_CACHE:-$PWD/.gpu/cache} EP_GPU_RESULTS=$results
if [ -n "${EP_VLLM_SITE:-}" ]; then
  export PYTHONPATH="$EP_VLLM_SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$EP_VLLM_SITE/bin:$PATH"
fi
if [ -n "${EP_NCCL_SITE:-}" ]; then
  export PYTHONPATH="$EP_NCCL_SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
# The lent machine has no NVLink SHARP / multicast: every process started here keeps these.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi -L
python3 -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)'
exec python3 -m pytest -p no:cacheprovider -o addopts="" -m gpu tests/gpu/test_one_gpu.py -v -s "$@"
