#!/usr/bin/env bash
# The two checks of the low-bit study (issue 14) that are not runs of its config, at 171×,
# seed 0, pair mnist-to-fmnist, with the study's teachers, data and recipe:
#   1. a longer fine-tuning (10 epochs instead of 1) of GMPQ, uniform and a third arm
#      (default edmips; pass the best other arm's name), to see that the ranking holds;
#   2. a conventional search on the target that is fair to it: EdMIPS over the 60,000 target
#      images for 5 epochs (the study's edmips-target arm has 1), then the study's 1-epoch
#      fine-tuning.
# Every step resumes (train and search checkpoints), so run it again after an interruption.
# Needs the study's run mnist-to-fmnist-c171-seed0 to have its policies.
# Usage: bash studies/fmnist-lowbit-extra.sh [ARM]
set -euo pipefail
cd "$(dirname "$0")/.."
arm3="${1:-edmips}"
gmpq="${GMPQ:-target/release/gmpq}"
study=studies/runs/fmnist-lowbit
run="$study/mnist-to-fmnist-c171-seed0"
out=studies/runs/fmnist-lowbit-extra
target=idx:../shared/datasets/fashion-mnist
teacher="$study/teacher-target/last.safetensors"
for arm in gmpq uniform "$arm3"; do
  policy="$run/search-$arm/policy.json"
  [ -f "$policy" ] || { echo "no $policy yet: the study has not searched that arm" >&2; exit 1; }
done
# A finished fine-tuning is skipped by its last.json (the finished checkpoints are not committed).
finished() {
  python3 -c 'import json,sys; sys.exit(json.load(open(sys.argv[1]))["epoch"] < int(sys.argv[2]))' \
    "$1/last.json" "$2" 2>/dev/null
}
mkdir -p "$out"
for arm in gmpq uniform "$arm3"; do
  finished "$out/finetune10-$arm" 10 || "$gmpq" --threads 1 finetune --init "$teacher" --policy "$run/search-$arm/policy.json" \
    --data "$target" --epochs 10 --out "$out/finetune10-$arm" --resume --lr 0.01 --hflip --seed 0
done
[ -f "$out/search-edmips-target-5ep/policy.json" ] || "$gmpq" --threads 1 search --teacher "$teacher" --data "$target" --target-compression 171 \
  --attribution-weight 0 --epochs 5 --step-epochs 10 --recipe scarce --w-bits 2,3,4,6 \
  --a-bits 2,3,4,6 --out "$out/search-edmips-target-5ep" --hflip --seed 0
finished "$out/finetune-edmips-target-5ep" 1 || "$gmpq" --threads 1 finetune --init "$teacher" --policy "$out/search-edmips-target-5ep/policy.json" \
  --data "$target" --epochs 1 --out "$out/finetune-edmips-target-5ep" --resume --lr 0.01 --hflip --seed 0
