#!/usr/bin/env bash
# Builds the engine if needed (installing its Debian packages on a fresh machine) and runs the whole
# test suite through CTest. GPU tests skip with a message where no GPU is present.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f build/CMakeCache.txt ]; then
  scripts/setup.sh
else
  cmake --build build -j"$(nproc)"
fi
ctest --test-dir build --output-on-failure -j"$(nproc)" "$@"
