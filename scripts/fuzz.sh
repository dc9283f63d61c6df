#!/usr/bin/env bash
# Builds the libFuzzer targets of fuzz/ (CMake preset `fuzz`: clang, ASan + UBSan, into build-fuzz/) and
# runs one of them, or all of them one after the other, for SECONDS each.
# Usage: scripts/fuzz.sh TARGET|all SECONDS      e.g. scripts/fuzz.sh image_request 600
#   TARGET: safetensors_header, gguf, checkpoint_index, tokenizer_json, tokenizer_encode, config, image_decode,
#           image_request, multipart, request_reader, lora_keys (the fuzz_ prefix may be given too).
# Each target starts from its committed seeds (fuzz/corpus/<target>/) copied into a scratch corpus,
# build-fuzz/corpus/<target>/, which keeps what libFuzzer finds between runs; the committed seeds are
# never written. A crash, sanitizer report, leak, uncaught exception, an input slower than 10 s, a single
# allocation over 512 MB or a process over 2 GB is a finding: its input is saved in build-fuzz/findings/<target>/ and the script exits
# non-zero (after running the remaining targets). Each run ends with one line: executions, coverage, findings.
# Reproduce a finding: build-fuzz/fuzz/fuzz_<target> build-fuzz/findings/<target>/crash-...
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -ne 2 ] || ! [[ $2 =~ ^[0-9]+$ ]]; then
  echo "usage: scripts/fuzz.sh TARGET|all SECONDS" >&2
  exit 2
fi
ALL=(safetensors_header gguf checkpoint_index tokenizer_json tokenizer_encode config image_decode image_request multipart
     request_reader lora_keys)
if [ "$1" = all ]; then
  targets=("${ALL[@]}")
else
  targets=("${1#fuzz_}")
  [ -d "fuzz/corpus/fuzz_${targets[0]}" ] || { echo "fuzz.sh: no target '$1' (one of: ${ALL[*]}, all)" >&2; exit 2; }
fi
seconds=$2

[ -f build-fuzz/CMakeCache.txt ] || cmake --preset fuzz >/dev/null
cmake --build --preset fuzz -j"$(nproc)" >/dev/null

# The engine's warnings (e.g. a tokenizer's added-token ids) would drown libFuzzer's output.
export ZIMAGE_LOG=error
failed=()
for t in "${targets[@]}"; do
  name=fuzz_$t
  corpus=build-fuzz/corpus/$name findings=build-fuzz/findings/$name log=build-fuzz/findings/$name.log
  mkdir -p "$corpus" "$findings"
  cp fuzz/corpus/"$name"/* "$corpus"/
  dict=()
  case $t in
    image_decode) dict=(-dict=fuzz/image.dict) ;;
    tokenizer_encode) ;;
    *) dict=(-dict=fuzz/json.dict) ;;
  esac
  status=0
  build-fuzz/fuzz/"$name" "$corpus" "${dict[@]}" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
    -malloc_limit_mb=512 -print_final_stats=1 -artifact_prefix="$findings"/ >"$log" 2>&1 || status=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2 || true)
  if [ "$status" -ne 0 ]; then
    failed+=("$t")
    tail -n 40 "$log" >&2
    echo "fuzz.sh: $name FAILED (exit $status) after ${execs:-?} executions; input in $findings/, log in $log" >&2
  else
    echo "fuzz.sh: $name: ${execs:-?} executions in $seconds s, coverage ${cov:-?} edges, 0 crashes"
  fi
done
if ((${#failed[@]})); then
  echo "fuzz.sh: findings in: ${failed[*]}" >&2
  exit 1
fi
