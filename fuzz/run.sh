#!/usr/bin/env bash
# Time-boxed fuzzing of the input readers, the worker's job file, artifact
# manifests and the rating server's JSON (cargo-fuzz, libFuzzer):
#   fuzz/run.sh [SECONDS per target, default 300] [TARGET...]
# Needs a nightly toolchain and `cargo install cargo-fuzz`. Seeds each
# target's corpus (fuzz/corpus/TARGET, not committed) from the shipped data
# and pipelines the first time; a crash lands in fuzz/artifacts/TARGET.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-300}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(spec idx cifar code_table job manifest rating)

seed() {
  local dir=fuzz/corpus/$1
  [ -n "$(ls -A "$dir" 2>/dev/null)" ] && return
  mkdir -p "$dir"
  case $1 in
    spec) cp pipelines/*.yaml "$dir"/ ;;
    idx | cifar) python3 - "$1" "$dir" <<'PY'
import gzip, struct, sys
kind, out = sys.argv[1], sys.argv[2]
if kind == "idx":
    images = gzip.open("data/fashion-mnist/train-images-idx3-ubyte.gz").read()
    labels = gzip.open("data/fashion-mnist/train-labels-idx1-ubyte.gz").read()
    for n in (1, 3):
        img = images[:4] + struct.pack(">I", n) + images[8:16] + images[16:16 + n * 784]
        lab = labels[:4] + struct.pack(">I", n) + labels[8:8 + n]
        open(f"{out}/raw-{n}", "wb").write(struct.pack("<H", len(img)) + img + lab)
    img = gzip.compress(images[:4] + struct.pack(">I", 1) + images[8:16 + 784])
    lab = gzip.compress(labels[:4] + struct.pack(">I", 1) + labels[8:9])
    open(f"{out}/gzip-1", "wb").write(struct.pack("<H", len(img)) + img + lab)
else:
    for variant, size in ((0, 3073), (1, 3074)):
        rec = bytes([3] * (size - 3072)) + bytes(range(256)) * 12
        open(f"{out}/cifar-{variant}", "wb").write(bytes([variant]) + rec * 2)
PY
    ;;
    code_table)
      local ws
      ws=$(mktemp -d)
      cargo run -q -- run pipelines/smoke.yaml codes2 --workspace "$ws" >/dev/null 2>&1
      for f in "$ws"/artifacts/*/data/*-00000.parquet; do
        # codes2 is 4x4 codes per row, codes1 8x8; the first byte is the count.
        for per_row in 16 64; do
          { printf "\\$(printf %o $per_row)"; cat "$f"; } > "$dir/$(basename "$(dirname "$(dirname "$f")")" | cut -c1-8)-$(basename "$f")-$per_row"
        done
      done
      chmod -R u+w "$ws" && rm -rf "$ws"
      ;;
    job | manifest | rating)
      local ws
      ws=$(mktemp -d)
      cargo run -q -- run pipelines/smoke.yaml --workspace "$ws" >/dev/null 2>&1
      case $1 in
        job) for j in "$ws"/scratch/*/job-*.json; do
            cp "$j" "$dir/$(basename "$(dirname "$j")" | cut -c1-12)-$(basename "$j")"
          done ;;
        manifest) for m in "$ws"/artifacts/*/manifest.json; do
            cp "$m" "$dir/$(basename "$(dirname "$m")" | cut -c1-12)"
          done ;;
        rating) python3 - "$ws" "$dir" <<'PY'
import glob, json, struct, sys
ws, out = sys.argv[1], sys.argv[2]
for path in glob.glob(f"{ws}/artifacts/*/data/manifest.json"):
    text = open(path, "rb").read()
    task = json.loads(text)["tasks"][0]["id"]
    for i, choice in enumerate(("left", "right", "up")):
        answer = json.dumps({"task_id": task, "choice": choice, "rater": "r1"}).encode()
        open(f"{out}/answer-{i}", "wb").write(struct.pack("<H", len(text)) + text + answer)
PY
          ;;
      esac
      chmod -R u+w "$ws" && rm -rf "$ws"
      ;;
  esac
}

for t in "${targets[@]}"; do
  seed "$t"
  echo "== $t: $(ls fuzz/corpus/$t | wc -l) seeds, ${seconds} s"
  cargo +nightly fuzz run "$t" "fuzz/corpus/$t" -- \
    -max_total_time="$seconds" -print_final_stats=1 -rss_limit_mb=4096 2>&1 |
    grep -E "stat::number_of_executed_units|stat::new_units_added|Done [0-9]+ runs|ERROR|SUMMARY|panicked" || true
done
