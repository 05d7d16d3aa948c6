#!/usr/bin/env bash
# The GPU check of the cuda feature, for a machine with a GPU and the CUDA
# toolkit (nvcc): builds with --features cuda, runs the smoke pipeline once
# on CPU and once with every stage on a GPU, and prints per stage the device,
# the seconds and the validation metrics of both runs side by side.
#
#   bash bench/gpu-smoke.sh            # the whole check
#   HAIC_GPU_SMOKE_CPU_ONLY=1 bash bench/gpu-smoke.sh   # the CPU half only
#                                      # (a default build; checks the script)
#   HAIC_BIN=PATH bash bench/gpu-smoke.sh   # a binary built elsewhere, no
#                                      # build (bench/gpu-stage.sh's)
#   HAIC_GPU_SMOKE_PRECISION=bf16 ...  # the GPU run's training and sampling
#                                      # stages with `precision: bf16`
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
runs="cpu gpu"
[ -n "${HAIC_GPU_SMOKE_CPU_ONLY:-}" ] && runs="cpu"
if [ -n "${HAIC_BIN:-}" ]; then
  bin=$HAIC_BIN
elif [ -n "${HAIC_GPU_SMOKE_CPU_ONLY:-}" ]; then
  cargo build --release -q
  bin=target/release/haic-pipe
else
  cargo build --release -q --features cuda
  bin=target/release/haic-pipe
fi
sed "s|^root: \.\.|root: $PWD|" pipelines/smoke.yaml >"$out/cpu.yaml"
{ cat "$out/cpu.yaml"; echo "defaults: {resources: {gpus: 1}}"; } >"$out/gpu.yaml"

query="SELECT s.stage, s.device,
  round((julianday(s.finished_at) - julianday(s.started_at)) * 86400, 2) AS seconds,
  group_concat(m.name || '=' || round(m.last_value, 4), ' ') AS metrics
FROM stage_runs s LEFT JOIN metric_summaries m ON m.stage_run_id = s.id
  AND m.name IN ('val.bits_per_dim', 'val.mse', 'val.accuracy', 'val.perplexity')
WHERE s.status = 'succeeded' GROUP BY s.id ORDER BY s.id"
# The smoke pipeline's stages that take `precision` (train_vq, train_ar, sample).
gpu_set=()
if [ -n "${HAIC_GPU_SMOKE_PRECISION:-}" ]; then
  for stage in vq1 vq2 decoder1 decoder2 prior baseline ham_samples baseline_samples; do
    gpu_set+=(-S "$stage.precision=$HAIC_GPU_SMOKE_PRECISION")
  done
fi
for run in $runs; do
  start=$(date +%s.%N)
  set_args=()
  [ "$run" = gpu ] && set_args=("${gpu_set[@]}")
  HAIC_WORKSPACE="$out/ws-$run" "$bin" run "$out/$run.yaml" "${set_args[@]}" >"$out/$run.log" 2>&1 ||
    { tail -20 "$out/$run.log"; exit 1; }
  end=$(date +%s.%N)
  echo "== $run: $(awk "BEGIN { printf \"%.1f\", $end - $start }") s in all"
  HAIC_WORKSPACE="$out/ws-$run" "$bin" registry -p "$out/$run.yaml" query "$query"
done
echo "(workspaces and logs: $out)"
