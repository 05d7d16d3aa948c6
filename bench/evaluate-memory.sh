#!/usr/bin/env bash
# Peak memory of an `evaluate` stage against the size of the real split
# its reference classifier trains on: a synthetic CIFAR-10-format data set
# of ROWS training images (32x32 RGB, each class its own brightness under
# noise) and 2,000 test images, preprocessed in shards of 5,000 rows, and
# 1,000 images standing in for samples; the evaluation (one epoch, a small
# classifier) then runs alone and GNU time reports its peak resident set
# (the driver and the stage's worker; the largest of them).
#   bash bench/evaluate-memory.sh [ROWS] [BINARY]
# ROWS defaults to 50,000; BINARY to the release build (built here).
set -euo pipefail
cd "$(dirname "$0")/.."
rows=${1:-50000}
bin=${2:-}
if [ -z "$bin" ]; then
    cargo build --release --quiet
    bin=target/release/haic-pipe
fi
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
python3 - "$dir" "$rows" <<'EOF'
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
# Class c: noise in [0, 64) plus 19 * c, one translate table per class.
tables = [bytes((b % 64 + 19 * c) for b in range(256)) for c in range(10)]
def write(name, count, salt):
    with open(os.path.join(d, name), "wb") as f:
        for i in range(count):
            c = (i * 7 + salt) % 10
            f.write(bytes([c]) + os.urandom(3072).translate(tables[c]))
write("train.bin", n, 0)
write("test.bin", 2000, 3)
write("samples.bin", 1000, 5)
EOF
cat > "$dir/bench.yaml" <<'EOF'
stages:
  real:
    kind: preprocess
    params:
      source: {format: cifar10, train: [train.bin], test: [test.bin]}
      shard_rows: 5000
  stand_in:
    kind: preprocess
    params:
      source: {format: cifar10, train: [samples.bin]}
  evaluation:
    kind: evaluate
    inputs: {real: real, samples: stand_in}
    params:
      classifier: {hidden: 8, features: 32, epochs: 1, batch_size: 64}
      resamples: 100
EOF
"$bin" run "$dir/bench.yaml" --workspace "$dir/ws" real stand_in > "$dir/prep.log" 2>&1 ||
    { tail -20 "$dir/prep.log"; exit 1; }
/usr/bin/time -f '%M %e' -o "$dir/time" "$bin" run "$dir/bench.yaml" --workspace "$dir/ws" \
    > "$dir/eval.log" 2>&1 || { tail -20 "$dir/eval.log"; exit 1; }
read -r kb seconds < "$dir/time"
table_mb=$(du -sm "$dir/ws" | cut -f1)
printf 'rows %s: evaluate peak RSS %.0f MB, %.0f s (workspace %s MB; %s)\n' \
    "$rows" "$(echo "$kb / 1024" | bc -l)" "$seconds" "$table_mb" "$bin"
cat "$dir"/ws/logs/*evaluation*.log | grep -E '^(real|samples):' | sed 's/^/  /' || true
