#!/usr/bin/env bash
# Runs the GPU test binaries of a bundle (scripts/device_bundle.sh) on a machine with an NVIDIA GPU,
# from the repository root, each one's output into LOG_DIR/<test>.log and a summary line per test.
#   scripts/gpu_tests.sh [LOG_DIR] [TEST ...]     (default: every cuda_*_test of the bundle)
# Sets up /tmp/z from build-dev/bundle.tar.xz and the library path (cuDNN and NCCL from PyTorch's
# Python packages where the machine has them); exit status 1 when a test binary failed.
set -uo pipefail
cd "$(dirname "$0")/.."
log_dir=${1:-gpu-test-logs}
shift || true
mkdir -p /tmp/z "$log_dir"
[ -x /tmp/z/bin/zimage ] || tar xJf build-dev/bundle.tar.xz -C /tmp/z
NV=$(python3 -c 'import nvidia;print(nvidia.__path__[0])' 2>/dev/null || true)
export LD_LIBRARY_PATH=/tmp/z/lib${NV:+:$NV/cudnn/lib:$NV/nccl/lib}:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export ZIMAGE_GOLDEN_DIR=$PWD/tests/golden ZIMAGE_ASSETS=$PWD/assets ZIMAGE_BINARY=/tmp/z/bin/zimage
tests=("$@")
[ ${#tests[@]} -gt 0 ] || tests=($(cd /tmp/z/bin && ls cuda_*_test))
status=0
for t in "${tests[@]}"; do
  start=$(date +%s)
  /tmp/z/bin/"$t" >"$log_dir/$t.log" 2>&1
  rc=$?
  summary=$(grep -E '^\[  (PASSED|FAILED|SKIPPED) ' "$log_dir/$t.log" | tr '\n' ' ')
  echo "$t rc=$rc $(( $(date +%s) - start ))s $summary"
  grep -E '^\[  FAILED  \]' "$log_dir/$t.log" | sort -u
  [ $rc -eq 0 ] || status=1
done
exit $status
