#!/usr/bin/env bash
# Installs a CUDA 13.0 compiler and headers from NVIDIA's PyPI wheels into
# DIR (default: ${TMPDIR:-/tmp}/haic-cuda-toolchain, outside the repository;
# no root, no GPU needed) and prints the environment that makes
#   cargo check --features cuda --workspace
# work on a machine without a GPU. Use it as
#   eval "$(scripts/cuda-toolchain.sh [DIR])"
#
# Why these five wheels (measured in the project's notes): the cu12 nvcc
# wheel has no `nvcc` driver; the CUDA 13 `nvidia-cuda-nvcc` wheel has it,
# and needs the runtime headers, `crt/` headers, NVVM and CCCL (`nv/target`)
# beside it. 13.0.x because the lent H200's driver (580) accepts CUDA 13.0
# PTX and no newer. CUDA_COMPUTE_CAP=90 (Hopper) is what candle's kernel
# build reads. None of the wheels has a `libcuda.so`: `cargo check` needs
# none; a full `cargo build` links one (see the README's GPU section).
set -euo pipefail
dir=${1:-${TMPDIR:-/tmp}/haic-cuda-toolchain}
root="$dir/root"
nvcc="$root/nvidia/cu13/bin/nvcc"
if [ ! -x "$nvcc" ]; then
  mkdir -p "$dir/wheels" "$root"
  python3 -m pip download --quiet --no-deps -d "$dir/wheels" \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88 \
    nvidia-nvvm==13.0.88 nvidia-cuda-cccl==13.0.85 >&2
  for w in "$dir"/wheels/*.whl; do
    python3 -m zipfile -e "$w" "$root" >&2
  done
  chmod +x "$root"/nvidia/cu13/bin/* "$root"/nvidia/cu13/nvvm/bin/* 2>/dev/null || true
fi
"$nvcc" --version >&2
cuda="$root/nvidia/cu13"
cat <<EOF
export PATH="$cuda/bin:\$PATH"
export CUDA_ROOT="$cuda"
export CUDA_PATH="$cuda"
export CUDA_COMPUTE_CAP=90
export NVCC_APPEND_FLAGS="-I$cuda/include/cccl"
EOF
