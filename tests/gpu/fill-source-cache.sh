#!/usr/bin/env bash
# Fills the one-GPU suite's source cache (.gpu/cache) with the DeepEP commits of `vllm026` and `current`
# through `python -m env fetch`. With a folder of local mirrors (default ../shared/sources, laid out as
# <owner>/<repo>.git), git's own URL rewriting reads them instead of GitHub: nothing else changes.
# A patch that cannot be downloaded here may be put into .gpu/cache/patches/ by hand: the build checks its sha256.
set -euo pipefail
cd "$(dirname "$0")/../.."
mirrors=${1:-../shared/sources}
cache=${EP_GPU_CACHE:-.gpu/cache}
if [ -d "$mirrors" ]; then
  export GIT_CONFIG_COUNT=1 GIT_CONFIG_KEY_0="url.file://$(cd "$mirrors" && pwd)/.insteadOf" GIT_CONFIG_VALUE_0="https://github.com/"
fi
status=0
for profile in vllm026 current; do
  python3 -m env fetch --profile "$profile" --only deepep --cache "$cache" || status=$?
done
du -sh "$cache"
exit $status
