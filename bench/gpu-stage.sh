#!/usr/bin/env bash
# Prepares the GPU check for a machine that has a GPU and no Rust (the
# device tool's): builds the `cuda` binary here with the CUDA toolchain
# from PyPI wheels and link stubs (scripts/cuda-toolchain.sh,
# scripts/cuda-stubs.sh), strips and packs it (xz) beside the CUDA runtime
# it links, in gpu-check/ (ignored by git; under the device tool's
# 64 MiB), with gpu-check/run.sh. There, from the repository root (the
# device tool: carry ["gpu-check"]):
#   bash gpu-check/run.sh      # unpack, find cuBLAS/cuRAND, bench/gpu-smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/cuda-toolchain.sh)"
scripts/cuda-stubs.sh "$CUDA_ROOT"
cargo build --release --locked --features cuda --bin haic-pipe
rm -rf gpu-check
mkdir gpu-check
strip -o gpu-check/haic-pipe target/release/haic-pipe
xz -T2 -6 gpu-check/haic-pipe
cp "$CUDA_ROOT/lib/libcudart.so.13" gpu-check/
cat >gpu-check/run.sh <<'RUN'
#!/usr/bin/env bash
# On the GPU machine, from the repository root: unpacks the binary, puts
# the CUDA runtime beside it and the system's or PyTorch's nvidia-* wheels'
# libraries (cuBLAS, cuRAND) on the library path, says what is missing if
# anything is, and runs bench/gpu-smoke.sh with it.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c 'import lzma, shutil; shutil.copyfileobj(lzma.open("gpu-check/haic-pipe.xz"), open("gpu-check/haic-pipe", "wb"))'
chmod +x gpu-check/haic-pipe
libs=$PWD/gpu-check
for d in $(python3 -c 'import nvidia, os; print(" ".join(os.path.join(p, d, "lib") for p in nvidia.__path__ for d in os.listdir(p)))' 2>/dev/null); do
  [ -d "$d" ] && libs="$libs:$d"
done
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if ldd gpu-check/haic-pipe | grep "not found"; then
  echo "the binary needs the libraries above (CUDA 13: cuBLAS 13, cuRAND 10); none found here" >&2
  exit 1
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || true
HAIC_BIN=gpu-check/haic-pipe bash bench/gpu-smoke.sh
RUN
chmod +x gpu-check/run.sh
du -sh gpu-check/* >&2
