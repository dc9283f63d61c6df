#!/usr/bin/env bash
# Installs the Debian packages the engine needs (idempotent) and builds it into build/ (Release).
# Usage: scripts/setup.sh            (as root, or with sudo available)
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  build-essential cmake pkg-config
  nlohmann-json3-dev libcli11-dev libcpp-httplib-dev libssl-dev
  libpng-dev libjpeg62-turbo-dev libwebp-dev zlib1g-dev
  libpcre2-dev libutf8proc-dev libopenblas-dev libgtest-dev
  # scripts/sanitize.sh and scripts/fuzz.sh: clang with its ASan, UBSan and libFuzzer runtimes
  clang libclang-rt-dev
  # scripts/cluster.sh and its tests: the load balancer, and PyYAML for tests/deploy_test.py
  haproxy python3-yaml
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

cmake -S . -B build -DCMAKE_BUILD_TYPE=Release ${ZIMAGE_CMAKE_ARGS:-}
cmake --build build -j"$(nproc)"
