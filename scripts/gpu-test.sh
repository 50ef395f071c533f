#!/usr/bin/env bash
# Runs every GPU test executable of the bundle (dist/tests) on the GPU machine, where a missing
# GPU is a failure rather than a skip, and prints one summary line last.
set -uo pipefail
cd "$(dirname "$0")"
export BRAIDINFER_REQUIRE_GPU=1 BRAIDINFER_TOKENIZER_DIR="$PWD/qwen3-0.6b"
log="${OUT:-/tmp}/gpu-tests.log"
: >"$log"
passed=0 failed=0 broken=0
for exe in tests/*; do
    echo "== $exe" | tee -a "$log"
    "$exe" --test-threads=1 "$@" >"$log.one" 2>&1
    code=$?
    cat "$log.one" >>"$log"
    grep -E '^test .* \.\.\. (ok|FAILED)|SKIPPED|panicked' "$log.one"
    result=$(grep -E '^test result:' "$log.one" | tail -n 1)
    p=$(sed -E 's/.* ([0-9]+) passed.*/\1/' <<<"$result")
    f=$(sed -E 's/.* ([0-9]+) failed.*/\1/' <<<"$result")
    passed=$((passed + ${p:-0})) failed=$((failed + ${f:-0}))
    [ "$code" -eq 0 ] || [ "${f:-0}" -gt 0 ] || broken=$((broken + 1))
done
rm -f "$log.one"
failed=$((failed + broken))
echo "gpu tests: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
