#!/usr/bin/env bash
# How OpenMP's spin count trades quiet-machine speed against throughput beside another busy
# process (docs/PERFORMANCE.md): ResNet-20 training step, batch 64, 2 threads, img/s.
# Quiet: each spin count alternates with the PyTorch script, ROUNDS times.
# Contended: a second 2-thread training (OpenMP active) runs beside gmpq.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/env.sh"
cd "$root"
cargo build --release --quiet --bin gmpq
rounds="${ROUNDS:-2}"
counts="${COUNTS:-0 3000 10000 30000 100000}"
gmpq="$root/target/release/gmpq"
ips() { python -c 'import json,sys; print(round(json.load(sys.stdin)["images_per_second"],1))'; }
echo "# quiet machine, img/s (GOMP_SPINCOUNT=0 is what OMP_WAIT_POLICY=PASSIVE does)"
for r in $(seq "$rounds"); do
  line="round $r: pytorch $(python bench/pytorch_train.py --threads 2 --batch-size 64 --steps 30 2>/dev/null | ips)"
  for c in $counts; do
    line="$line | spin $c: $(GOMP_SPINCOUNT=$c "$gmpq" --threads 2 bench train --batch-size 64 --steps 30 --json | ips)"
  done
  echo "$line"
done
echo "# contended: a second 2-thread training (OMP_WAIT_POLICY=ACTIVE) beside gmpq, img/s"
for r in $(seq "$rounds"); do
  line="round $r:"
  for c in $counts; do
    OMP_WAIT_POLICY=ACTIVE "$gmpq" --threads 2 bench train --steps 1000 --json > /dev/null 2>&1 &
    other=$!
    sleep 3
    v=$(GOMP_SPINCOUNT=$c "$gmpq" --threads 2 bench train --steps 15 --warmup 2 --json | ips)
    kill "$other" 2>/dev/null; wait "$other" 2>/dev/null || true
    line="$line spin $c: $v |"
  done
  echo "$line"
done
