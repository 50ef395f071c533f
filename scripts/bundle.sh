#!/usr/bin/env bash
# Fills dist/ with what the GPU machine needs (it has no cargo): the release binaries, the GPU
# test executables (tests/gpu_*), the benchmark executables, the tokenizer files and
# gpu-test.sh; and dist.tar.xz, the same packed to travel (under the device tool's 64 MiB carry
# limit; unpack with `tar xJf dist.tar.xz` there). Usage: scripts/bundle.sh SHARED_MODEL_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
shared_model=${1:-../shared/models/qwen3-0.6b}

artifacts() {  # "kind name path" for every executable cargo builds with the given arguments
    cargo "$@" --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["target"]["kind"][0], m["target"]["name"], m["executable"])
'
}

rm -rf dist && mkdir -p dist/tests dist/benches dist/qwen3-0.6b
while read -r kind name exe; do cp "$exe" dist/; done < <(artifacts build --release --bins)
while read -r kind name exe; do
    case "$kind $name" in "test gpu"*) cp "$exe" "dist/tests/$name" ;; esac
done < <(artifacts test --release --no-run)
while read -r kind name exe; do
    [ "$kind" = bench ] && cp "$exe" "dist/benches/$name"
done < <(artifacts bench --no-run)
cp "$shared_model"/{tokenizer.json,tokenizer_config.json,generation_config.json,config.json} dist/qwen3-0.6b/
cp scripts/gpu-test.sh dist/
# cargo's errors are hidden above (its JSON goes to the parser): fail loudly on a missing build.
for needed in dist/braidinfer dist/sweep dist/quant-compare dist/tests/gpu_engine dist/tests/gpu_kernels dist/tests/gpu_products dist/tests/gpu_attention dist/benches/decode; do
    [ -x "$needed" ] || { echo "bundle: $needed was not built (run cargo build --release --all-targets to see why)" >&2; exit 1; }
done
tar cJf dist.tar.xz dist
du -sh dist dist.tar.xz
