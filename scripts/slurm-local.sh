#!/usr/bin/env bash
# A one-node Slurm cluster on loopback for the Slurm executor's tests:
# slurmctld + slurmd + munged from Debian's packages, two fake GPUs as gres.
#
#   scripts/slurm-local.sh install      apt-get the packages (root or sudo)
#   scripts/slurm-local.sh start [DIR]  start it; prints the SLURM_CONF to use
#   scripts/slurm-local.sh stop [DIR]   cancel its jobs, stop its daemons
#
# DIR (default /tmp/haic-slurm) holds everything: config, munge key and
# socket, state, logs, pid files. Clients find the cluster through
# SLURM_CONF=DIR/etc/slurm.conf. HAIC_SLURM_PORT (default 16817, and the
# next port) lets two such clusters run side by side. Facts this rests on:
# ../shared/notes/slurm-local.md (munged as the munge user with a 711 socket
# folder, fake GPUs as character devices, timeouts on every client call).
set -euo pipefail

cmd=${1:-}
dir=${2:-${HAIC_SLURM_DIR:-/tmp/haic-slurm}}
conf="$dir/etc/slurm.conf"
port=${HAIC_SLURM_PORT:-16817}

need_root() {
  if [ "$(id -u)" != 0 ]; then
    echo "slurm-local: $1 needs root (slurmd and munged switch users)" >&2
    exit 1
  fi
}

# A start that failed stops what it started.
fail() {
  echo "slurm-local: $1" >&2
  "$0" stop "$dir" >/dev/null 2>&1 || true
  exit 1
}

# kill PID if it is still the daemon named NAME (a pid file can be stale).
stop_pid() {
  local file=$1 name=$2 pid
  [ -f "$file" ] || return 0
  pid=$(cat "$file" 2>/dev/null || true)
  if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null || true)" = "$name" ]; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do
      [ -d "/proc/$pid" ] || break
      sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

case "$cmd" in
install)
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null &&
    command -v sbatch >/dev/null && command -v munged >/dev/null; then
    exit 0
  fi
  sudo_=""
  [ "$(id -u)" = 0 ] || sudo_=sudo
  $sudo_ apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -q slurmctld slurmd slurm-client munge >/dev/null
  ;;

start)
  need_root start
  "$0" stop "$dir" >/dev/null 2>&1 || true
  rm -rf "$dir"
  mkdir -p "$dir"/{etc,state,spool,log,dev,munge/run,munge/lib}
  host=$(hostname -s)

  # munge: key readable by munge only; socket folder 711 (700 is refused).
  dd if=/dev/urandom of="$dir/munge/munge.key" bs=1 count=1024 status=none
  chown -R munge:munge "$dir/munge"
  chmod 400 "$dir/munge/munge.key"
  chmod 711 "$dir/munge/run" "$dir/munge"
  runuser -u munge -- /usr/sbin/munged \
    --key-file="$dir/munge/munge.key" \
    --socket="$dir/munge/run/munge.socket" \
    --pid-file="$dir/munge/run/munged.pid" \
    --log-file="$dir/munge/munged.log" \
    --seed-file="$dir/munge/lib/munged.seed"

  # Fake GPUs: character devices, or slurmd refuses them and never sets
  # CUDA_VISIBLE_DEVICES.
  for n in 0 1; do mknod "$dir/dev/nvidia$n" c 195 "$n"; done

  node=$(slurmd -C | head -1 | sed 's/ RealMemory=[0-9]*//')
  cat >"$conf" <<EOF
ClusterName=haic
SlurmctldHost=localhost
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/run/munge.socket
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
MinJobAge=3600
ReturnToService=2
MpiDefault=none
JobRequeue=1
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/log/jobcomp.txt
GresTypes=gpu
$node NodeAddr=127.0.0.1 Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  cat >"$dir/etc/gres.conf" <<EOF
AutoDetect=off
NodeName=$host Name=gpu File=$dir/dev/nvidia[0-1]
EOF
  export SLURM_CONF="$conf"
  slurmctld -i || fail "slurmctld did not start; logs in $dir/log"
  slurmd || fail "slurmd did not start; logs in $dir/log"
  # Ready when the node is idle; stop early if a daemon died.
  for _ in $(seq 100); do
    state=$(timeout 5 sinfo -h -o %T 2>/dev/null || true)
    [ "$state" = idle ] && break
    for d in slurmctld slurmd; do
      pid=$(cat "$dir/$d.pid" 2>/dev/null || true)
      if [ -z "$pid" ] || [ ! -d "/proc/$pid" ]; then
        sleep 0.5
        pid=$(cat "$dir/$d.pid" 2>/dev/null || true)
        if [ -z "$pid" ] || [ ! -d "/proc/$pid" ]; then
          tail -20 "$dir/log/$d.log" >&2 || true
          fail "$d did not start (its log is above; another cluster on port $port? set HAIC_SLURM_PORT)"
        fi
      fi
    done
    sleep 0.2
  done
  if [ "$state" != idle ]; then
    fail "node not idle after 20 s (state: ${state:-none}); logs in $dir/log"
  fi
  echo "$conf"
  ;;

stop)
  if [ -f "$conf" ]; then
    SLURM_CONF="$conf" timeout 10 scancel --user="$(id -un)" 2>/dev/null || true
  fi
  stop_pid "$dir/slurmd.pid" slurmd
  stop_pid "$dir/slurmctld.pid" slurmctld
  stop_pid "$dir/munge/run/munged.pid" munged
  ;;

*)
  echo "usage: $0 install | start [DIR] | stop [DIR]" >&2
  exit 2
  ;;
esac
