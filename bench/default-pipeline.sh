#!/usr/bin/env bash
# Runs a preset pipeline (default: pipelines/tiny.yaml) in a fresh workspace
# with the release binary, times it, and prints what the README quotes: the
# wall time, every AR model's bits/dim, the levels' reconstructions and the
# evaluation's figures with their 95 % intervals.
#   bash bench/default-pipeline.sh [PIPELINE] [WORKSPACE]
set -euo pipefail
cd "$(dirname "$0")/.."
pipeline=${1:-pipelines/tiny.yaml}
ws=${2:-$(mktemp -d)/ws}
cargo build --release --quiet
bin=target/release/haic-pipe
rm -rf "$ws"
mkdir -p "$(dirname "$ws")"
start=$(date +%s.%N)
"$bin" run "$pipeline" --workspace "$ws" --jobs 2 > "$ws.log" 2>&1 || { tail -20 "$ws.log"; exit 1; }
end=$(date +%s.%N)
printf 'wall: %.0f s (%s, --jobs 2, nproc %s)\n' "$(echo "$end - $start" | bc)" "$pipeline" "$(nproc)"
q() { "$bin" registry --workspace "$ws" query "$1" --format table; }
q "SELECT r.stage, s.name, round(s.last_value, 4) AS value
   FROM metric_summaries s JOIN stage_runs r ON r.id = s.stage_run_id
   WHERE s.name IN ('val.bits_per_dim', 'bound.bits_per_dim', 'baseline.bits_per_dim', 'val.psnr',
                    'val.mse', 'val.perplexity', 'val.accuracy', 'val.reconstruction_psnr',
                    'val.reconstruction_psnr_lo', 'val.reconstruction_psnr_hi')
      OR s.name LIKE 'eval.%'
   ORDER BY r.stage, s.name"
q "SELECT stage, round(julianday(finished_at) * 86400 - julianday(started_at) * 86400, 1) AS seconds
   FROM stage_runs ORDER BY started_at"
echo "workspace: $ws"
