#!/usr/bin/env bash
# Builds the CUDA-enabled engine here (no GPU needed) and packs what a GPU machine needs to run it:
# the zimage binary, the GPU test and bench binaries, and the shared libraries the GPU machine lacks (OpenBLAS,
# image codecs, PCRE2, utf8proc), into build-dev/bundle.tar.xz (git-ignored; carry build-dev).
# On the GPU machine:
#   mkdir -p /tmp/z && tar xJf build-dev/bundle.tar.xz -C /tmp/z
#   NV=$(python3 -c 'import nvidia;print(nvidia.__path__[0])')
#   export LD_LIBRARY_PATH=/tmp/z/lib:$NV/cudnn/lib:$NV/nccl/lib:/usr/local/cuda/lib64
#   export ZIMAGE_GOLDEN_DIR=$PWD/tests/golden ZIMAGE_ASSETS=$PWD/assets ZIMAGE_BINARY=/tmp/z/bin/zimage
#   /tmp/z/bin/cuda_backend_test          (or scripts/gpu_tests.sh LOG_DIR: every cuda_*_test, set up as above)
#   BUILD_DIR=build scripts/device_bundle.sh   reuses another CUDA-enabled build folder (default build-cuda)
set -euo pipefail
cd "$(dirname "$0")/.."
B=${BUILD_DIR:-build-cuda}
cmake -S . -B "$B" -DCMAKE_BUILD_TYPE=Release -DZIMAGE_CUDA=ON >/dev/null
cmake --build "$B" -j"$(nproc)"
stage=$(mktemp -d)
mkdir -p "$stage/bin" "$stage/lib"
cp "$B/zimage" "$B"/bench_* "$stage/bin/"
# The GPU tests only (the CPU tests run in CI; the device call carries at most 64 MiB with the tree).
for t in "$B"/tests/cuda_*_test; do cp "$t" "$stage/bin/"; done
strip "$stage"/bin/*
# Shared libraries outside glibc/libstdc++ and outside CUDA (those come from the GPU machine).
for lib in $(ldd "$B/zimage" "$B"/bench_* "$B"/tests/cuda_*_test | awk '/=>/ {print $3}' | sort -u); do
  case "$(basename "$lib")" in
    libc.so*|libm.so*|libgcc_s*|libstdc++*|libpthread*|libdl*|librt*|ld-linux*|libcud*|libcublas*|libnccl*) ;;
    *) cp -L "$lib" "$stage/lib/" ;;
  esac
done
mkdir -p build-dev
# xz -9: ~11 MiB instead of ~23 MiB at -1, so the tree (~47 MiB) and the bundle fit the 64 MiB a call carries.
XZ_OPT=-9 tar cJf build-dev/bundle.tar.xz -C "$stage" .
rm -rf "$stage"
ls -la build-dev/bundle.tar.xz
