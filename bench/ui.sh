#!/usr/bin/env bash
# The dashboard's benchmark (bench/src/ui_bench.rs): builds the release
# binaries, makes a registry of RUNS runs x POINTS_PER_RUN points (default
# 100,000 x 100, plus a 1,000,000-point series) and times `haic-pipe ui`
# on it over HTTP. About 3 minutes here after the build.
#   bash bench/ui.sh [RUNS POINTS_PER_RUN]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bin haic-pipe -p haic-pipe
cargo build --release --locked -p haic-bench --bin ui-bench
HAIC_BIN=target/release/haic-pipe target/release/ui-bench "$@"
