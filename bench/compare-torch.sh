#!/usr/bin/env bash
# haic-pipe's candle models against their PyTorch twins (bench/torch_twin.py),
# on this machine, in one run, with the same thread count.
#
#   bash bench/compare-torch.sh [RUNS] [STEPS]
#
# RUNS rounds (default 5), each running the candle benchmark
# (`compare-bench`) and then the twin, each timing every convolution layer
# shape of the two models alone (forward and backward at batch 64), STEPS
# training steps (default 10) of the level-1 VQ model and of the gated
# PixelCNN, and 3 sampling runs of 10 images. The tables give the median
# over rounds of each side's median (GFLOP/step: 3 x the layers' forward
# FLOPs from their shapes, masked taps not counted, one count for both
# sides); the last line reads
#   ratio_vs_torch vq=X ar=Y sample=Z
# (candle throughput / PyTorch throughput: above 1, candle is faster).
#
# PyTorch comes from a virtual environment outside the repository
# ($HAIC_TORCH_VENV, default ~/.cache/haic-pipe/torch-venv), created with
# `pip install torch numpy` when missing (about 5 GB; it runs on the CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-5}
STEPS=${2:-10}
THREADS=${THREADS:-2}
VENV=${HAIC_TORCH_VENV:-$HOME/.cache/haic-pipe/torch-venv}

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "creating $VENV (pip install torch numpy; large download)" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet torch numpy
fi
cargo build --release --quiet -p haic-bench --bin compare-bench

out=$(mktemp)
trap 'rm -f "$out"' EXIT
for r in $(seq "$RUNS"); do
  echo "round $r of $RUNS" >&2
  RAYON_NUM_THREADS=$THREADS ./target/release/compare-bench --steps "$STEPS" >>"$out"
  OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS \
    "$VENV/bin/python" bench/torch_twin.py --steps "$STEPS" --threads "$THREADS" \
    | sed 's/^{/{"impl": "torch", /' >>"$out"
done

"$VENV/bin/python" - "$out" "$THREADS" <<'PY'
import json, statistics, sys
import torch
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
threads = sys.argv[2]
def med(impl, model, key, kind="model"):
    v = [r[key] for r in rows if r.get("impl") == impl and r.get(kind) == model]
    return statistics.median(v)
peaks = [r["matmul_peak_gflops"] for r in rows if "matmul_peak_gflops" in r]
peak = statistics.median(peaks)
print(f"{threads} threads; PyTorch {torch.__version__}; matmul peak (candle gemm, 1024^3 f32): "
      f"median {peak:.1f} GFLOP/s ({min(peaks):.1f}-{max(peaks):.1f} over {len(peaks)} rounds)")
print(f"{'model':<8} {'candle':>12} {'pytorch':>12} {'ratio':>7}   GFLOP/step  candle % of peak  pytorch % of peak")
ratios = {}
for model, unit in [("vq", "ms/step"), ("ar", "ms/step"), ("sample", "s/10 img")]:
    c, t = med("candle", model, "seconds"), med("torch", model, "seconds")
    ratios[model] = med("candle", model, "throughput") / med("torch", model, "throughput")
    scale = 1e3 if unit == "ms/step" else 1.0
    line = f"{model:<8} {c * scale:>9.1f} {unit.split('/')[0]:<2} {t * scale:>9.1f} {unit.split('/')[0]:<2} {ratios[model]:>6.2f}x"
    if model != "sample":
        g = med("candle", model, "gflop_per_step")
        line += f"   {g:>10.2f}  {100 * g / c / peak:>15.1f}  {100 * g / t / peak:>17.1f}"
    print(line)
ops = list(dict.fromkeys(r["op"] for r in rows if "op" in r))
if ops:
    print(f"{'layer (batch 64, forward + backward)':<36} {'candle':>9} {'pytorch':>9} {'ratio':>7}")
for op in ops:
    c, t = med("candle", op, "seconds", "op"), med("torch", op, "seconds", "op")
    print(f"{op:<36} {c * 1e3:>6.1f} ms {t * 1e3:>6.1f} ms {t / c:>6.2f}x")
print("ratio_vs_torch " + " ".join(f"{m}={ratios[m]:.2f}" for m in ["vq", "ar", "sample"]))
PY
