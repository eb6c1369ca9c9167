#!/usr/bin/env bash
# Why do the searched policies trail uniform w4a2 after fine-tuning? For each arm of the low-bit
# study's finished MNIST-pair runs, the policy's accuracy on 10,000 Fashion-MNIST *training*
# images (not the test set) right after calibration, before any fine-tuning, and the mean
# weight and activation bits of the policy. Prints one TSV row per (budget, seed, arm).
# Usage: bash studies/diagnose-lowbit.sh [STUDY_DIR] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
study="${1:-studies/runs/fmnist-lowbit}"
out="${2:-runs/diagnose-lowbit}"
gmpq="${GMPQ:-target/release/gmpq}"
data="idx:../shared/datasets/fashion-mnist"
teacher="$study/teacher-target/last.safetensors"
mkdir -p "$out"
printf 'run\tarm\tmean_w\tmean_a\tcalibrated_train_top1\tfinetuned_test_top1\n'
for run in "$study"/mnist-to-fmnist-c*-seed*; do
  [ -f "$run/report.html" ] || continue
  name="$(basename "$run")"
  for arm in gmpq edmips hawq uniform; do
    policy="$run/search-$arm/policy.json"
    [ -f "$policy" ] || continue
    ck="$out/$name-$arm.safetensors"
    [ -f "$ck" ] || "$gmpq" --threads 1 quantize --checkpoint "$teacher" \
      --policy "$policy" --calib-data "$data" --test-limit 100 --out "$ck" >/dev/null
    top1="$("$gmpq" --threads 1 eval --checkpoint "$ck" --data "$data" --split train \
      --limit 10000 --json 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["top1"])')"
    read -r mw ma ft < <(python3 - "$policy" "$run/finetune-$arm/last.json" <<'PY'
import json, sys
p = json.load(open(sys.argv[1]))["layers"]
try:
    ft = json.load(open(sys.argv[2]))["history"][-1]["test_top1"]
except Exception:
    ft = float("nan")
print(sum(l["w_bits"] for l in p) / len(p), sum(l["a_bits"] for l in p) / len(p), ft)
PY
)
    printf '%s\t%s\t%.2f\t%.2f\t%s\t%s\n' "$name" "$arm" "$mw" "$ma" "$top1" "$ft"
  done
done
