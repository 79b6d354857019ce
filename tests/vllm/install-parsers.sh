#!/usr/bin/env bash
# Installs the real `vllm serve` argument parsers of several vLLM versions on a machine without GPUs,
# for `launch check` and tests/test_vllm_parser.py. Each version's official wheel goes into a folder of
# its own with --no-deps (used via PYTHONPATH); one virtual environment holds a CPU build of torch and
# the small libraries the parser imports (tests/vllm/parser-requirements.txt, pinned). The wheels'
# compiled CUDA parts cannot load without a GPU and are removed (the parser does not need them).
#
#   bash tests/vllm/install-parsers.sh [DIR]        # default DIR: .cache/vllm-parsers
#   VERSIONS="0.26.0" bash tests/vllm/install-parsers.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=${1:-$here/../../.cache/vllm-parsers}
versions=${VERSIONS:-"0.10.1.1 0.26.0 0.33.0"}
mkdir -p "$root"; root=$(cd "$root" && pwd)
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

if [ ! -x "$root/venv/bin/python" ]; then python3 -m venv "$root/venv"; fi
py=$root/venv/bin/python
# --no-deps everywhere: nothing may pull a CUDA build of torch or triton in.
"$py" -m pip install -q --no-deps --only-binary=:all: \
  filelock==4.2.11 fsspec==2026.9.0 Jinja2==3.1.6 MarkupSafe==3.0.4 mpmath==1.3.0 networkx==3.6.1 \
  sympy==1.14.0 typing_extensions==4.16.0
bash "$here/../install-cpu-torch.sh" "$py" --no-deps --only-binary=:all:
"$py" -m pip install -q --no-deps --only-binary=:all: -r "$here/parser-requirements.txt"

for v in $versions; do
  if [ -f "$root/vllm-$v/.installed" ]; then echo "vllm $v: already in $root/vllm-$v"; continue; fi
  rm -rf "$root/vllm-$v"
  "$py" -m pip install -q --no-deps --only-binary=:all: --target "$root/vllm-$v" "vllm==$v"
  find "$root/vllm-$v" -name '*.so' -delete
  rm -f "$root/vllm-$v/vllm/vllm-rs"
  touch "$root/vllm-$v/.installed"
  echo "vllm $v: $(du -sm "$root/vllm-$v" | cut -f1) MB in $root/vllm-$v"
done
echo "parsers ready: EP_VLLM_PARSERS=$root"
