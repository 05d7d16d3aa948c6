#!/usr/bin/env bash
# Prepares the device check for a machine that has a GPU and no Rust (the
# device tool's): builds the `cuda` binaries here (haic-pipe and the
# benchmark gpu-bench, and gpu-bench again with `--features cudnn`) with the
# CUDA toolchain from PyPI wheels and link stubs (scripts/cuda-toolchain.sh,
# scripts/cuda-stubs.sh), strips and packs them (xz) beside the CUDA
# runtime they link, in gpu-check/ (ignored by git; 32 MB, under the device
# tool's 64 MiB), with gpu-check/run.sh. There, from the repository root
# (the device tool: carry ["gpu-check"]):
#   bash gpu-check/run.sh      # smoke vq ar sample ops: more than one
#                              # call's 10 minutes with three variants
#   GPU_CHECK_PARTS="smoke vq ar" bash gpu-check/run.sh   # about 6 minutes
#   GPU_CHECK_PARTS="sample ops" bash gpu-check/run.sh    # then these
#   (by the part times of the runs in docs/device-checks/)
#   GPU_CHECK_TWINS=0 ...      # without the PyTorch twins
#   GPU_CHECK_VARIANTS="gemm taps" ...  # only these candle variants
#                              # (default "plain taps gemm"; "cudnn", the
#                              # cuDNN build, is slower on an H200:
#                              # docs/benchmarks.md; about 6 minutes more)
# Parts, each on its own time limit so that one failing leaves the rest:
#   smoke   the smoke pipeline on CPU, then on the GPU (bench/gpu-smoke.sh);
#           again with HAIC_GPU_CONV=gemm, and with `precision: bf16`
#   vq ar   a training step of imagenet128.yaml's vq1 / decoder1 in three
#           candle variants (gpu-bench: candle's convolutions; gpu-bench
#           with HAIC_GPU_CONV=taps: stride-1 layers tap-wise, strided and
#           transposed ones over blocks, autograd's backward; with
#           HAIC_GPU_CONV=gemm: tap-wise with their own
#           adjoint, columns not kept; the variants plain, taps and
#           gemm; cudnn, gpu-bench-cudnn, when named), each in f32 and
#           bf16, at batch 64, halved until it fits; then the PyTorch twin
#           (bench/torch_twin.py) in f32 and with bf16 autocast, at batch
#           64 (and 16 for decoder1)
#   sample  decoder1's sampler on 64 images, on-device against host
#           drawing, each variant
#   ops     each convolution shape of the two models alone (forward and
#           backward), each variant and the twin, f32 and bf16: where a
#           step's time goes
#   memory  (only when named) peak memory of a vq1 step at batch 8, 16,
#           32 and a decoder1 step at 2, 4, 8, each variant and
#           precision: the per-image slope and the fixed part, for a
#           memory estimate at load time
# GPU_CHECK_PRECISIONS="f32" (default "f32 bf16") limits the precisions.
# Every result is a JSON line in the output and in $OUT/gpu-check.log;
# peak GPU memory is nvidia-smi's, polled every 0.2 s.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/cuda-toolchain.sh)"
scripts/cuda-stubs.sh "$CUDA_ROOT"
rm -rf gpu-check
mkdir gpu-check
pack() { strip -o "gpu-check/$2" "target/release/$1" && xz -T2 -6 "gpu-check/$2"; }
# Both builds select the same packages, so that only candle and what uses
# it rebuild between them.
cargo build --release --locked -p haic-pipe -p haic-bench \
  --features haic-pipe/cuda,haic-bench/cuda --bin haic-pipe --bin gpu-bench
pack haic-pipe haic-pipe
pack gpu-bench gpu-bench
cargo build --release --locked -p haic-pipe -p haic-bench \
  --features haic-pipe/cuda,haic-bench/cudnn --bin gpu-bench
pack gpu-bench gpu-bench-cudnn
cp "$CUDA_ROOT/lib/libcudart.so.13" gpu-check/
cat >gpu-check/run.sh <<'RUN'
#!/usr/bin/env bash
# On the GPU machine, from the repository root: see bench/gpu-stage.sh.
# The libraries come from the system or from PyTorch's nvidia-* wheels.
set -uo pipefail
cd "$(dirname "$0")/.."
log=${OUT:-/tmp}/gpu-check.log
: >"$log"
say() { echo "$@" | tee -a "$log"; }
# The candle variants: candle's convolutions, the tap-wise convolutions
# (stride 1; strided and transposed over blocks) with autograd's backward
# (HAIC_GPU_CONV=taps, same binary) and with their own
# (HAIC_GPU_CONV=gemm), and through cuDNN: those GPU_CHECK_VARIANTS
# names (checked before anything is unpacked).
variants=()
for name in ${GPU_CHECK_VARIANTS:-plain taps gemm}; do
  case $name in
    plain) variants+=("gpu-check/gpu-bench") ;;
    taps | gemm) variants+=("env HAIC_GPU_CONV=$name gpu-check/gpu-bench") ;;
    cudnn) variants+=("gpu-check/gpu-bench-cudnn") ;;
    *) say "GPU_CHECK_VARIANTS: unknown variant $name (plain, taps, gemm or cudnn)"; exit 2 ;;
  esac
done
for packed in gpu-check/*.xz; do
  python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1] + ".xz"), open(sys.argv[1], "wb"))' "${packed%.xz}"
  chmod +x "${packed%.xz}"
done
libs=$PWD/gpu-check
for d in $(python3 -c 'import nvidia, os; print(" ".join(os.path.join(p, d, "lib") for p in nvidia.__path__ for d in os.listdir(p)))' 2>/dev/null); do
  [ -d "$d" ] && libs="$libs:$d"
done
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if ldd gpu-check/haic-pipe gpu-check/gpu-bench gpu-check/gpu-bench-cudnn | grep "not found"; then
  say "the binaries need the libraries above (CUDA 13: cuBLAS 13, cuRAND 10, cuDNN 9); none found here"
  exit 1
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$log"
python3 -c 'import torch; print("torch", torch.__version__, torch.version.cuda)' 2>&1 | tee -a "$log"
parts=${GPU_CHECK_PARTS:-smoke vq ar sample ops}

# Runs "$@" under a time limit, its output into the log, with nvidia-smi's
# peak memory used (MiB) over the run.
measured() {
  local limit=$1; shift
  local mem; mem=$(mktemp)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 >"$mem" 2>/dev/null &
  local poll=$!
  local start; start=$(date +%s.%N)
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  kill "$poll" 2>/dev/null; wait "$poll" 2>/dev/null
  say "## rc=$rc wall=$(awk "BEGIN { printf \"%.1f\", $(date +%s.%N) - $start }")s peak_mib=$(sort -n "$mem" | tail -1): $*"
  rm -f "$mem"
  return "$rc"
}

precisions=${GPU_CHECK_PRECISIONS:-f32 bf16}

# Each variant and precision at the largest batch of 64, 32, 16 that runs;
# then the twins.
train() {
  local part=$1 twin_batches=$2 v p batch
  for v in "${variants[@]}"; do
    for p in $precisions; do
      for batch in 64 32 16; do
        # shellcheck disable=SC2086 # $v is a command and its words
        measured 150 $v --only "$part" --batch "$batch" --steps 3 --precision "$p" && break
        say "## $v --only $part --precision $p at batch $batch did not run"
      done
    done
  done
  [ "${GPU_CHECK_TWINS:-1}" = 0 ] && return
  for batch in $twin_batches; do
    for amp in "" "--amp bf16"; do
      measured 120 python3 bench/torch_twin.py --pipeline pipelines/imagenet128.yaml \
        --device cuda --only "$part" --batch "$batch" --steps 3 $amp
    done
  done
}

for part in $parts; do
  say "# $part"
  case $part in
    smoke)
      HAIC_BIN=gpu-check/haic-pipe measured 240 bash bench/gpu-smoke.sh
      HAIC_GPU_CONV=gemm HAIC_BIN=gpu-check/haic-pipe measured 240 bash bench/gpu-smoke.sh
      HAIC_GPU_SMOKE_PRECISION=bf16 HAIC_BIN=gpu-check/haic-pipe measured 240 bash bench/gpu-smoke.sh ;;
    vq) train vq "64" ;;
    ar) train ar "64 16" ;;
    sample)
      for v in "${variants[@]}"; do
        # shellcheck disable=SC2086
        for p in $precisions; do
          measured 150 $v --only sample --sample-images 64 --sample-rows 4 --precision "$p"
        done
      done ;;
    ops)
      for v in "${variants[@]}"; do
        # shellcheck disable=SC2086
        for p in $precisions; do
          measured 150 $v --only ops --steps 3 --precision "$p"
        done
      done
      [ "${GPU_CHECK_TWINS:-1}" = 0 ] && continue
      for p in $precisions; do
        amp=(); [ "$p" = bf16 ] && amp=(--amp bf16)
        measured 120 python3 bench/torch_twin.py --pipeline pipelines/imagenet128.yaml \
          --device cuda --only ops --steps 3 "${amp[@]}"
      done ;;
    memory)
      for v in "${variants[@]}"; do
        for p in $precisions; do
          for batch in 8 16 32; do
            # shellcheck disable=SC2086
            measured 90 $v --only vq --batch "$batch" --steps 1 --precision "$p"
          done
          for batch in 2 4 8; do
            # shellcheck disable=SC2086
            measured 90 $v --only ar --batch "$batch" --steps 1 --precision "$p"
          done
        done
      done ;;
    *) say "unknown part $part" ;;
  esac
done
RUN
chmod +x gpu-check/run.sh
du -sh gpu-check/* >&2
