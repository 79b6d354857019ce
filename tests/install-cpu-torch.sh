#!/usr/bin/env bash
# Installs a CPU build of torch into the given Python's environment, the same way on every machine:
# PyTorch's own CPU index first (a stock machine's default index serves the CUDA build on Linux x86_64),
# then the default index (a machine whose pip configuration or cache already provides a CPU build).
# Refuses a CUDA build: the tests run on machines without GPUs and must not pull gigabytes of CUDA libraries.
#
#   bash tests/install-cpu-torch.sh PYTHON [pip options, e.g. --no-deps]
set -euo pipefail
py=$1; shift
version=${TORCH_VERSION:-2.13.0}
cpu_index=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
is_cpu() { "$py" -c 'import sys, torch; sys.exit(0 if not torch.version.cuda else 1)' 2>/dev/null; }
if "$py" -m pip install -q --timeout 20 --retries 1 --index-url "$cpu_index" "$@" "torch==$version"; then
  echo "torch $version: CPU build from $cpu_index"
else
  echo "torch $version: $cpu_index not reachable; trying the default index"
  "$py" -m pip install -q "$@" "torch==$version"
fi
is_cpu || { echo "a CUDA build of torch was installed: set TORCH_CPU_INDEX to a CPU wheel index" >&2; exit 1; }
