#!/usr/bin/env bash
# Regenerates the README's figures in docs/ from the tiny pipeline (cached
# stages are reused; a fresh workspace trains everything, ~14 minutes on 2
# cores): the sample grids of the hierarchy (at temperatures 1.0 and 0.8)
# and of the flat baseline, vq1's, decoder1's and the chain's reconstructions, and
# the bits/dim and evaluation tables of `haic-pipe report`, rendered to PNG
# by headless Chromium (Debian: apt-get install chromium), and the
# dashboard's three pages (`haic-pipe ui`, through tests/browser/ui.mjs:
# `npm ci --prefix tests/browser`), comparing the newest two runs.
set -euo pipefail
cd "$(dirname "$0")/.."
haic() { cargo run -q --release -- "$@"; }
haic run pipelines/tiny.yaml
run=$(haic registry -p pipelines/tiny.yaml query \
  "SELECT MAX(id) AS id FROM runs WHERE status = 'succeeded'" --format csv | tail -n 1)
out=$(mktemp -d)
haic report "$run" -p pipelines/tiny.yaml -o "$out"
cp "$out/samples-ham-samples.png" docs/samples-ham.png
cp "$out/samples-baseline-samples.png" docs/samples-baseline.png
cp "$out/samples-ham-samples-cold.png" docs/samples-ham-cold.png
cp "$out/reconstructions-vq1.png" docs/reconstructions-vq1.png
cp "$out/reconstructions-decoder1.png" docs/reconstructions-decoder1.png
cp "$out/reconstructions-chain-reconstructions.png" docs/reconstructions-chain.png
"${HAIC_CHROMIUM:-chromium}" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$out/chromium" --hide-scrollbars --window-size=900,780 \
  --screenshot="$PWD/docs/tables.png" "file://$out/tables.html"
previous=$(haic registry -p pipelines/tiny.yaml query \
  "SELECT id FROM runs WHERE id < $run ORDER BY id DESC LIMIT 1" --format csv | tail -n +2)
if [ -n "$previous" ]; then
  target/release/haic-pipe ui -p pipelines/tiny.yaml --port 0 >"$out/ui.txt" &
  ui=$!
  trap 'kill $ui 2>/dev/null || true' EXIT
  until grep -q '^dashboard: ' "$out/ui.txt" 2>/dev/null; do sleep 0.2; done
  url=$(sed -n 's/^dashboard: //p' "$out/ui.txt")
  HAIC_UI_SCREENSHOTS="$PWD/docs" node tests/browser/ui.mjs shots "$url" "$run" "$previous"
else
  echo "one run only: the dashboard's screenshots (two runs compared) are left as they are" >&2
fi
echo "docs/ regenerated from run $run (report: $out/index.html)"
