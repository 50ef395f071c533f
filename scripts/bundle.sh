#!/usr/bin/env bash
# Fills dist/ with what the GPU machine needs (it has no cargo): the release binaries, the GPU
# test executable, the tokenizer files and gpu-test.sh. Usage: scripts/bundle.sh SHARED_MODEL_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
shared_model=${1:-../shared/models/qwen3-0.6b}

cargo build --release --bins
tests=$(cargo test --release --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in m["target"]["kind"]:
        print(m["target"]["name"], m["executable"])
')

rm -rf dist && mkdir -p dist/tests dist/qwen3-0.6b
for bin in target/release/braidinfer target/release/sweep target/release/quant-compare; do
    [ -f "$bin" ] && cp "$bin" dist/
done
while read -r name exe; do
    case "$name" in gpu*) cp "$exe" "dist/tests/$name" ;; esac
done <<<"$tests"
cp "$shared_model"/{tokenizer.json,tokenizer_config.json,generation_config.json,config.json} dist/qwen3-0.6b/
cp scripts/gpu-test.sh dist/
du -sh dist; ls -la dist dist/tests
