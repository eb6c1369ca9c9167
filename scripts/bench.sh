#!/usr/bin/env bash
# Training-step throughput, gmpq vs PyTorch, same machine, same run (docs/PERFORMANCE.md).
# Quiet: the two engines alternate, ROUNDS times each. Contended: one busy process (a spin
# loop) runs beside gmpq, with OpenMP waiting passively (gmpq's default) and actively.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/env.sh"
cd "$root"
cargo build --release --quiet --bin gmpq
rounds="${ROUNDS:-3}"
threads="${THREADS:-$(nproc)}"
gmpq="$root/target/release/gmpq"
echo "# quiet machine, ResNet-20, batch 64, 3x32x32, $threads threads"
for r in $(seq "$rounds"); do
  echo "gmpq    round $r: $("$gmpq" --threads "$threads" bench train --batch-size 64 --steps 30 --json | python -c 'import json,sys; print(round(json.load(sys.stdin)["images_per_second"],1))') img/s"
  echo "pytorch round $r: $(python bench/pytorch_train.py --threads "$threads" --batch-size 64 --steps 30 | python -c 'import json,sys; print(round(json.load(sys.stdin)["images_per_second"],1))') img/s"
done
echo "# contended: one other busy process"
bash -c 'while :; do :; done' &
spin=$!
trap 'kill $spin 2>/dev/null' EXIT
sleep 1
for r in $(seq "$rounds"); do
  echo "gmpq PASSIVE (default) round $r: $("$gmpq" --threads "$threads" bench train --batch-size 64 --steps 30 --json | python -c 'import json,sys; print(round(json.load(sys.stdin)["images_per_second"],1))') img/s"
  echo "gmpq ACTIVE            round $r: $(OMP_WAIT_POLICY=ACTIVE "$gmpq" --threads "$threads" bench train --batch-size 64 --steps 10 --warmup 2 --json | python -c 'import json,sys; print(round(json.load(sys.stdin)["images_per_second"],1))') img/s"
done
