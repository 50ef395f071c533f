#!/usr/bin/env bash
# Prints ptxas's resource report (registers, shared memory, stack, spills) of every kernel in
# csrc/, for the default target sm_90a. Read it before spending GPU time.
set -euo pipefail
cd "$(dirname "$0")/.."
nvcc=""
for candidate in "${CUDA_HOME:-}/bin/nvcc" "$(command -v nvcc || true)" .toolchain/cuda/nvidia/cu13/bin/nvcc; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then nvcc=$candidate; break; fi
done
[ -n "$nvcc" ] || { echo "no nvcc: run make setup" >&2; exit 1; }
for source in csrc/*.cu; do
    echo "== $source"
    "$nvcc" -std=c++17 -O3 --expt-relaxed-constexpr -Icsrc -gencode=arch=compute_90a,code=sm_90a \
        -Xptxas -v -c "$source" -o /dev/null 2>&1 \
        | grep -E "Compiling entry|Used [0-9]+ registers|spill" \
        | sed -E "s/ptxas info\\s*: //" | c++filt || true
done
