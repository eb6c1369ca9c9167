#!/usr/bin/env bash
# Training-step throughput, gmpq vs PyTorch, same machine, same run, and inference through
# libtorch and ONNX Runtime (docs/PERFORMANCE.md).
# Quiet: the engines alternate, ROUNDS times each: gmpq as shipped (channels-last conv weights,
# OpenMP spin count 10,000) and with contiguous weights; PyTorch as shipped, with the model and
# input in channels_last, and with its optimizer's multi-tensor `foreach` path and set-to-None
# gradients off.
# Contended: a second 2-thread training runs beside gmpq, which spins 10,000 times (default),
# waits passively, or waits actively.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/env.sh"
cd "$root"
cargo build --release --quiet --bin gmpq
rounds="${ROUNDS:-3}"
gmpq="$root/target/release/gmpq"
ips() { python -c 'import json,sys; print(round(json.load(sys.stdin)["images_per_second"],1))'; }
noforeach="$(mktemp)"
trap 'rm -f "$noforeach"' EXIT
sed -e 's/weight_decay=5e-4)/weight_decay=5e-4, foreach=False)/' \
    -e 's/opt.zero_grad()/opt.zero_grad(set_to_none=False)/' bench/pytorch_train.py > "$noforeach"
echo "# quiet machine, ResNet-20, batch 64, 3x32x32, 2 threads, img/s"
for r in $(seq "$rounds"); do
  echo "round $r: gmpq $("$gmpq" --threads 2 bench train --batch-size 64 --steps 30 --json | ips)" \
       "| gmpq contiguous $("$gmpq" --threads 2 bench train --batch-size 64 --steps 30 --param-layout contiguous --json | ips)" \
       "| pytorch $(python bench/pytorch_train.py --threads 2 --batch-size 64 --steps 30 2>/dev/null | ips)" \
       "| pytorch channels_last $(python bench/pytorch_train.py --threads 2 --batch-size 64 --steps 30 --channels-last 2>/dev/null | ips)" \
       "| pytorch without foreach $(python "$noforeach" --threads 2 --batch-size 64 --steps 30 2>/dev/null | ips)"
done
echo "# quiet machine, quantization-aware training step (ResNet-20, batch 64, 3x32x32, 2 threads,"
echo "# the mixed 2/3/4/6-bit policy bench/resnet20-mixed.json), img/s; the FP step beside it"
policy="$root/bench/resnet20-mixed.json"
for r in $(seq "$rounds"); do
  echo "round $r: gmpq fp $("$gmpq" --threads 2 bench train --batch-size 64 --steps 30 --json | ips)" \
       "| gmpq qat fused $("$gmpq" --threads 2 bench train --batch-size 64 --steps 30 --policy "$policy" --json | ips)" \
       "| gmpq qat reference $("$gmpq" --threads 2 --quant-kernels reference bench train --batch-size 64 --steps 30 --policy "$policy" --json | ips)" \
       "| pytorch fp $(python bench/pytorch_train.py --threads 2 --batch-size 64 --steps 30 2>/dev/null | ips)" \
       "| pytorch qat $(python bench/pytorch_train.py --threads 2 --batch-size 64 --steps 30 --policy "$policy" 2>/dev/null | ips)"
done
echo "# the full GMPQ search step (ResNet-18 CIFAR stem, supernet {2,3,4,6}, batch 32, 2 threads), s"
secs() { python -c 'import json,sys; print(round(json.load(sys.stdin)["median_step_seconds"],3))'; }
for r in $(seq "$rounds"); do
  echo "round $r: fused $("$gmpq" --threads 2 bench search-step --json | secs)" \
       "| reference $("$gmpq" --threads 2 --quant-kernels reference bench search-step --json | secs)" \
       "| FP training step of the same network $("$gmpq" --threads 2 bench train --model resnet18 --batch-size 32 --steps 10 --json | secs)"
done
echo "# inference (random weights): gmpq's FP32 libtorch network, its FP32 ONNX export and its QDQ"
echo "# export (uniform w4a4) through ONNX Runtime, batch 1 and 64, 2 threads, img/s"
"$gmpq" --threads 2 bench infer --model resnet20 --input-size 28 --channels 1
"$gmpq" --threads 2 bench infer --model resnet18 --stem cifar --input-size 32 --channels 3 --steps 5 --warmup 1
"$gmpq" --threads 2 bench infer --model mobilenetv2 --stem cifar --input-size 32 --channels 3 --steps 10
echo "# contended: a second 2-thread training (OMP active) runs beside gmpq, img/s"
for mode in "default (GOMP_SPINCOUNT=10000)" "OMP_WAIT_POLICY=PASSIVE" "OMP_WAIT_POLICY=ACTIVE"; do
  OMP_WAIT_POLICY=ACTIVE "$gmpq" --threads 2 bench train --steps 1000 --json > /dev/null 2>&1 &
  other=$!
  sleep 3
  if [ "$mode" = "default (GOMP_SPINCOUNT=10000)" ]; then
    v=$("$gmpq" --threads 2 bench train --steps 15 --warmup 2 --json | ips)
  else
    v=$(env "$mode" "$gmpq" --threads 2 bench train --steps 15 --warmup 2 --json | ips)
  fi
  kill "$other" 2>/dev/null; wait "$other" 2>/dev/null || true
  echo "$mode: $v"
done
