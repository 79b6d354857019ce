#!/usr/bin/env bash
# Runs the GPU acceptance suite on a machine with 2 NVIDIA GPUs where vLLM is importable.
#   bash tests/gpu/run-on-2-gpus.sh [RESULTS_DIR] [pytest args...]
# vLLM staged as wheels in a folder (machines without a registry): set EP_VLLM_SITE to that folder
# (it is put on PYTHONPATH and its bin/ on PATH).
# DeepEP (sections 4-6 of tests/gpu/test_two_gpus.py): with EP_GPU_CACHE, a source cache filled by
# tests/gpu/fill-source-cache.sh, DeepEP is built first for both profiles by `python -m env build`; without it
# those tests skip unless .stack/PROFILE already holds a current build. EP_NCCL_SITE: a folder holding NCCL >=
# 2.30.4 (nvidia-nccl-cu13), put first on PYTHONPATH for the `current` profile only (DeepEP v2).
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
mkdir -p "$results"
if [ -n "${EP_GPU_CACHE:-}" ]; then
  export EP_GPU_CACHE
  python3 -m env build --profile vllm026 --only deepep --offline --cache "$EP_GPU_CACHE" 2>&1 | tee "$results/build-vllm026.txt" \
    || echo "# vllm026 (DeepEP v1) not built: its tests skip (see $results/build-vllm026.txt)"
  PYTHONPATH="${EP_NCCL_SITE:+$EP_NCCL_SITE:}${PYTHONPATH:-}" \
    python3 -m env build --profile current --only deepep --offline --cache "$EP_GPU_CACHE" 2>&1 | tee "$results/build-current.txt" \
    || echo "# current (DeepEP v2) not built: its tests skip (see $results/build-current.txt)"
fi
EP_GPU_RESULTS="$results" exec python3 -m pytest -p no:cacheprovider -o addopts="" -m gpu tests/gpu/test_two_gpus.py -v -s "$@"
