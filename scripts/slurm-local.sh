#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, and a tiny gmpq study run on it as a job array.
#
#   scripts/slurm-local.sh start   install (Debian's slurmctld, slurmd, slurm-client, munge)
#                                  and start the daemons by hand (no systemd needed)
#   scripts/slurm-local.sh check   start, then run a 2-run study as a job array plus a
#                                  duplicated task, and check every run finished once and the
#                                  tables equal those of the same study run by one process
#   scripts/slurm-local.sh stop    stop the daemons
#
# Needs root (apt-get, daemons). Everything it writes lives under $GMPQ_SLURM_DIR
# (default /tmp/gmpq-slurm) and /etc/slurm/slurm.conf.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
work=${GMPQ_SLURM_DIR:-/tmp/gmpq-slurm}
node=$(hostname -s)

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null; then
    return
  fi
  echo "slurm-local: installing slurmctld slurmd slurm-client munge" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
}

configure() {
  mkdir -p "$work"/{state,spool,log} /etc/slurm
  local cpus mem
  cpus=$(nproc)
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  cat >/etc/slurm/slurm.conf <<EOF
ClusterName=gmpq-local
SlurmctldHost=$node
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$work/state
SlurmdSpoolDir=$work/spool
SlurmctldPidFile=$work/slurmctld.pid
SlurmdPidFile=$work/slurmd.pid
SlurmctldLogFile=$work/log/slurmctld.log
SlurmdLogFile=$work/log/slurmd.log
NodeName=$node CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
  install
  configure
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key 2>/dev/null || true
  chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
  pgrep -x munged >/dev/null || su -s /bin/sh munge -c munged 2>/dev/null || munged --force
  pgrep -x slurmctld >/dev/null || slurmctld
  pgrep -x slurmd >/dev/null || slurmd
  for _ in $(seq 60); do
    if sinfo -h -N -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
      echo "slurm-local: node $node is up ($(nproc) CPUs)" >&2
      return
    fi
    sleep 1
  done
  echo "slurm-local: the node did not come up; see $work/log/" >&2
  sinfo -N >&2 || true
  exit 1
}

stop() {
  pkill -x slurmd 2>/dev/null || true
  pkill -x slurmctld 2>/dev/null || true
  pkill -x munged 2>/dev/null || true
}

# Waits until no job of this user is pending or running.
wait_for_jobs() {
  for _ in $(seq 1800); do
    [ -z "$(squeue -h -u "$(id -un)" -o %i)" ] && return
    sleep 2
  done
  echo "slurm-local: jobs still running after an hour" >&2
  squeue >&2
  exit 1
}

# results.csv without the search_seconds column (timings differ between processes).
tables() {
  python3 - "$1/results.csv" <<'EOF'
import csv, sys
rows = list(csv.reader(open(sys.argv[1])))
skip = rows[0].index("search_seconds")
for r in rows:
    print(",".join(v for i, v in enumerate(r) if i != skip))
EOF
}

check() {
  start
  bash scripts/setup.sh
  # shellcheck source=/dev/null
  source scripts/env.sh
  cargo build --release --quiet
  local gmpq="$repo/target/release/gmpq" dir="$work/study"
  rm -rf "$dir"
  mkdir -p "$dir"
  "$gmpq" subset --data idx:data/fashion-mnist --train 512 --test 200 --out "$dir/fm512" >/dev/null
  cat >"$dir/study.json" <<EOF
{"target": {"data": "idx:$dir/fm512", "epochs": 1},
 "pairs": [{"name": "fm", "proxy": {"data": "idx:$dir/fm512:128", "epochs": 1},
            "budgets": [{"compression": 64, "seeds": 1}, {"compression": 100, "seeds": 1}]}],
 "arms": ["gmpq", "uniform"], "search_epochs": 1, "target_search_epochs": 1,
 "finetune_epochs": 1}
EOF
  echo "slurm-local: the study in one process (the reference)" >&2
  "$gmpq" --threads 1 study "$dir/study.json" --out "$dir/one" >"$dir/one.log"
  echo "slurm-local: the same study as a Slurm job array, plus a duplicated task 0" >&2
  "$gmpq" --threads 1 study "$dir/study.json" --out "$dir/array" --sbatch >"$dir/submit.sh"
  bash "$dir/submit.sh"
  sbatch --parsable --array=0 --cpus-per-task=1 --output="$dir/array/slurm/duplicate-%A.out" \
    --wrap "$gmpq --threads 1 study $dir/study.json --out $dir/array --array" >/dev/null
  wait_for_jobs
  # The tables job ran when the array ended; the duplicate may have ended after it, so the
  # tables are written once more from what is on disk.
  "$gmpq" study "$dir/study.json" --out "$dir/array" --tables-only >/dev/null
  local runs ok=1
  for run in fm-c64-seed0 fm-c100-seed0; do
    runs=$(cat "$dir"/array/slurm/*.out | grep -c "$run/search-gmpq/policy.json: " || true)
    echo "slurm-local: $run searched by $runs task(s)" >&2
    [ "$runs" = 1 ] || ok=0
  done
  if diff <(tables "$dir/one") <(tables "$dir/array") >&2; then
    echo "slurm-local: the job array's tables equal the one-process tables" >&2
  else
    ok=0
  fi
  ls "$dir"/array/slurm/ >&2
  [ "$ok" = 1 ] || { echo "slurm-local: check FAILED" >&2; exit 1; }
  echo "slurm-local: check passed" >&2
}

case "${1:-check}" in
  start) start ;;
  stop) stop ;;
  check) check ;;
  *) echo "usage: $0 [start|check|stop]" >&2; exit 2 ;;
esac
