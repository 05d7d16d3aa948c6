#!/usr/bin/env bash
# A 1,000-member sweep (seed x 10, x x 100) of a 10-stage command pipeline
# whose first 3 stages read neither var: load + plan (`status` before the
# first run), the first run, a no-op re-run of the whole sweep (median of
# 3, peak RSS of the driver), that the shared stages ran exactly once
# (from the registry), and `compare` over the 1,000 members (median of 3).
#
#   cargo build --release
#   bash bench/sweep.sh
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
haic="$repo/target/release/haic-pipe"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

seeds=$(seq -s, 0 9)
xs=$(seq -s, 0 99)
cat > pipeline.yaml <<'EOF'
vars: {seed: 0, x: 0}
stages:
  s1: {kind: command, cmd: "echo s1 > s1.txt", outs: [s1.txt]}
  s2: {kind: command, cmd: "cat $HAIC_INPUT_UP/s1.txt > s2.txt", inputs: {up: s1}, outs: [s2.txt]}
  s3: {kind: command, cmd: "cat $HAIC_INPUT_UP/s2.txt > s3.txt", inputs: {up: s2}, outs: [s3.txt]}
  by_seed: {kind: command, cmd: "echo ${vars.seed} > seed.txt", inputs: {up: s3}, outs: [seed.txt]}
  by_x: {kind: command, cmd: "echo ${vars.x} > x.txt", inputs: {up: s3}, outs: [x.txt]}
  both: {kind: command, cmd: "cat $HAIC_INPUT_A/seed.txt $HAIC_INPUT_B/x.txt > both.txt; echo \"score 0 $(( ${vars.seed} + ${vars.x} * 10 ))\" >> \"$HAIC_METRICS\"", inputs: {a: by_seed, b: by_x}, outs: [both.txt]}
  t1: {kind: command, cmd: "cp $HAIC_INPUT_UP/both.txt t1.txt", inputs: {up: both}, outs: [t1.txt]}
  t2: {kind: command, cmd: "cp $HAIC_INPUT_UP/t1.txt t2.txt", inputs: {up: t1}, outs: [t2.txt]}
  t3: {kind: command, cmd: "cp $HAIC_INPUT_UP/t2.txt t3.txt", inputs: {up: t2}, outs: [t3.txt]}
  t4: {kind: command, cmd: "cp $HAIC_INPUT_UP/t3.txt t4.txt", inputs: {up: t3}, outs: [t4.txt]}
EOF
sweep=(--sweep "seed=$seeds" --sweep "x=$xs")

median3() { printf '%s\n' "$@" | sort -n | sed -n 2p; }
timed() { # prints "seconds peak_rss_kib" of the command (and its exit status)
  local rc=0
  /usr/bin/time -f "%e %M" -o time.txt "$@" > /dev/null 2>&1 || rc=$?
  tail -1 time.txt
  return $rc
}

# status exits 1 (stale stages); its time is still the load + plan.
plan=() ; for i in 1 2 3; do plan+=("$(timed "$haic" status pipeline.yaml "${sweep[@]}" || true)"); done
first=$(timed "$haic" run pipeline.yaml "${sweep[@]}" --quiet)
noop_t=(); noop_m=()
for i in 1 2 3; do
  r=$(timed "$haic" run pipeline.yaml "${sweep[@]}" --quiet)
  noop_t+=("${r% *}"); noop_m+=("${r#* }")
done
ran=$("$haic" registry query "SELECT stage, count(*) AS n FROM stage_runs WHERE run_id = 1 AND status = 'succeeded' AND stage IN ('s1', 's2', 's3') GROUP BY stage" --format csv | tail -n +2 | tr '\n' ' ')
copies=$("$haic" registry query "SELECT count(*) FROM stage_runs WHERE run_id = 1 AND status = 'succeeded'" --format csv | tail -1)
cmp_t=()
for i in 1 2 3; do
  s=$(date +%s.%N); "$haic" compare 1 --metric score --format json > compare.json; e=$(date +%s.%N)
  cmp_t+=("$(python3 -c "print(f'{$e - $s:.3f}')")")
done
groups=$(python3 -c "import json; c = json.load(open('compare.json')); print(len(c['runs']), 'members,', len(c['groups']), 'groups of n =', c['groups'][0]['n'])")

plan_t=(); for p in "${plan[@]}"; do plan_t+=("${p% *}"); done
plan_m=(); for p in "${plan[@]}"; do plan_m+=("${p#* }"); done
echo "load + plan (status, fresh workspace): median $(median3 "${plan_t[@]}") s of 3 (${plan_t[*]}); peak RSS $(( $(printf '%s\n' "${plan_m[@]}" | sort -n | tail -1) / 1024 )) MiB"
echo "first run: ${first% *} s, $copies stage runs; shared stages (stage count): $ran"
echo "no-op re-run: median $(median3 "${noop_t[@]}") s of 3 (${noop_t[*]}); driver peak RSS $(( $(printf '%s\n' "${noop_m[@]}" | sort -n | tail -1) / 1024 )) MiB"
echo "compare over the sweep: median $(median3 "${cmp_t[@]}") s of 3 (${cmp_t[*]}); $groups"
