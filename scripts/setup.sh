#!/usr/bin/env bash
# Idempotent set-up for building braidinfer: a CUDA 13.0 compiler (from PyPI, into
# .toolchain/cuda, unless a toolkit is already there) and libclang for bindgen.
set -euo pipefail
cd "$(dirname "$0")/.."

have_toolkit() {
    [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ] && return 0
    command -v nvcc >/dev/null 2>&1 && return 0
    [ -x .toolchain/cuda/nvidia/cu13/bin/nvcc ] && return 0
    return 1
}

if have_toolkit; then
    echo "setup: CUDA compiler found"
else
    echo "setup: installing the CUDA 13.0 compiler from PyPI into .toolchain/cuda"
    python3 -m pip install --quiet --disable-pip-version-check --target .toolchain/cuda \
        nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88 \
        nvidia-cuda-cccl==13.0.85 nvidia-nvvm==13.0.88
    .toolchain/cuda/nvidia/cu13/bin/nvcc --version | tail -n 1
fi

if ls /usr/lib/llvm-*/lib/libclang.so* /usr/lib/x86_64-linux-gnu/libclang*.so* >/dev/null 2>&1 \
    && ls /usr/lib/llvm-*/lib/clang/*/include/stddef.h >/dev/null 2>&1; then
    echo "setup: libclang found"
else
    echo "setup: installing libclang-dev (for bindgen)"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libclang-dev >/dev/null
fi
