#!/usr/bin/env bash
# The EP checks on one GPU: DeepEP's dispatch + combine through `python -m preflight -m ep`.
#   EP_STACK_PREFIX=/path/to/stack bash tests/gpu/run-ep-preflight.sh [RESULTS_DIR] [pytest args...]
# EP_STACK_PREFIX: where `python -m env build` built DeepEP (its manifest gives the paths preflight
# puts before the node's own, as the launcher does). EP_DEEPEP_TESTS (optional): a DeepEP checkout's
# tests/ folder, to run DeepEP's own tests/test_low_latency.py on the same GPU for comparison.
set -euo pipefail
cd "$(dirname "$0")/../.."
results=${1:-gpu-results}; shift || true
: "${EP_STACK_PREFIX:?set EP_STACK_PREFIX to the stack prefix where DeepEP was built (python -m env build --prefix ...)}"
export EP_STACK_PREFIX
# No NVLink SHARP / multicast on the lent H200 machines (same settings as run-on-2-gpus.sh).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi -L
python3 -m env status --prefix "$EP_STACK_PREFIX" || true
EP_GPU_RESULTS="$results" exec python3 -m pytest -p no:cacheprovider -o addopts="" -m gpu tests/gpu/test_ep_preflight.py -v -s "$@"
