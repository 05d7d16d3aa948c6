#!/usr/bin/env bash
# Link-time stand-ins for the CUDA libraries a full `--features cuda` build
# links (driver, NVRTC, cuRAND, cuBLAS, cuBLASLt; cuDNN for `--features cudnn`), for a machine with no
# GPU driver: the toolchain's wheels (scripts/cuda-toolchain.sh) have none
# of them. Each stub defines every symbol cudarc declares for that library
# as a function that returns 100 (CUDA_ERROR_NO_DEVICE; an error status in
# each of these libraries), and carries the real library's soname, so the
# binary records the real names and the GPU machine's libraries are the
# ones loaded at run time (the stubs are never shipped; loaded by mistake,
# they say "no device" instead of doing anything).
#   scripts/cuda-stubs.sh CUDA_ROOT
# writes CUDA_ROOT/lib/stubs/lib{cuda,nvrtc,curand,cublas,cublasLt,cudnn}.so,
# where cudarc's build looks (`lib/stubs` under CUDA_ROOT), and a
# `libcudart.so` link to the runtime wheel's real `libcudart.so.13`
# (candle's MoE kernels link the runtime: carry that file with the binary).
set -euo pipefail
root=${1:?usage: scripts/cuda-stubs.sh CUDA_ROOT (from scripts/cuda-toolchain.sh)}
cd "$(dirname "$0")/.."
cudarc=$(cargo metadata --format-version 1 --locked --features cuda 2>/dev/null |
  python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc").rsplit("/", 1)[0])')
out="$root/lib/stubs"
mkdir -p "$out"
# module, library, soname (CUDA 13's)
while read -r module lib soname; do
  c="$out/$lib.c"
  grep -oE '^\s+fn [A-Za-z][A-Za-z0-9_]*\(' "$cudarc/src/$module/sys/mod.rs" |
    sed -E 's/^\s+fn //; s/\($//' | grep -E '^(cu|nvrtc|curand|cublas)' | sort -u |
    sed 's/.*/int &(void) { return 100; }/' > "$c"
  cc -shared -fPIC -o "$out/lib$lib.so" -Wl,-soname,"$soname" "$c"
  rm -f "$c"
  echo "$out/lib$lib.so: $(nm -D --defined-only "$out/lib$lib.so" | grep -c ' T ') symbols, soname $soname" >&2
done <<'LIBS'
driver cuda libcuda.so.1
nvrtc nvrtc libnvrtc.so.13
curand curand libcurand.so.10
cublas cublas libcublas.so.13
cublaslt cublasLt libcublasLt.so.13
cudnn cudnn libcudnn.so.9
LIBS
# The runtime is in the wheels, only without its unversioned name.
if [ -e "$root/lib/libcudart.so.13" ]; then
  ln -sf ../libcudart.so.13 "$out/libcudart.so"
fi
