#!/usr/bin/env bash
# Builds the engine and its whole test suite with AddressSanitizer and UndefinedBehaviorSanitizer (CMake
# preset `asan-ubsan`: clang, CPU only, into build-asan/) and runs every test through CTest. A sanitizer
# report (out-of-bounds access, use after free, leak, undefined behaviour) fails the test it happens in.
# Usage: scripts/sanitize.sh [ctest arguments]     (scripts/setup.sh installs clang on a fresh machine)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f build-asan/CMakeCache.txt ] || cmake --preset asan-ubsan >/dev/null
cmake --build --preset asan-ubsan -j"$(nproc)"
ctest --preset asan-ubsan -j"$(nproc)" "$@"
