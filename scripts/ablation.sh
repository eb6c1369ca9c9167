#!/usr/bin/env bash
# The investigation behind docs/RESULTS.md: what the attribution term does in the study's
# MNIST-2k → Fashion-MNIST pair at 64×. Only the GMPQ arm is run, seed-matched with the study
# (same teachers, proxy subset, budget, search and fine-tuning recipe), changing one thing:
#   aw80  attribution weight 80 (the study uses 20; 0 is its EdMIPS arm)
#   aw200 attribution weight 200
#   p3    a fixed attribution exponent p = 3 (the reference script's default) instead of the
#         capacity-aware rule
#   n8000 a proxy of 8,000 MNIST images instead of 2,000 (same teacher), so 4x the α steps;
#         not in the default VARIANTS (about 4x the search time)
# Needs the study's teachers (gmpq study studies/fmnist.json). Rerun to resume. VARIANTS and
# SEEDS pick a part, e.g. for two workers on disjoint seeds:
#   THREADS=1 SEEDS="0 1" VARIANTS="aw200" scripts/ablation.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/env.sh"
cd "$root"
study="${STUDY:-runs/study}"
out="${OUT:-runs/ablation}"
data="${DATA:-../shared/datasets}"
for f in "$study/teacher-mnist-to-fmnist/last.safetensors" "$study/teacher-target/last.safetensors"; do
  [ -f "$f" ] || { echo "ablation: $f is missing; run the study first" >&2; exit 1; }
done
# GMPQ=PATH runs a prebuilt binary (e.g. a copy, while the tree is being edited).
gmpq="${GMPQ:-target/release/gmpq}"
[ -n "${GMPQ:-}" ] || cargo build --release --quiet --bin gmpq
for seed in ${SEEDS:-0 1 2}; do
  for variant in "aw80:--attribution-weight 80" "p3:--p 3" "aw200:--attribution-weight 200" "n8000:"; do
    name="${variant%%:*}"
    case " ${VARIANTS:-aw80 p3 aw200} " in *" $name "*) ;; *) continue ;; esac
    proxy_images=2000
    if [ "$name" = n8000 ]; then proxy_images=8000; fi
    # shellcheck disable=SC2086 # the variant's flags are meant to split
    "$gmpq" --threads "${THREADS:-2}" pipeline --model resnet20 \
      --proxy "idx:$data/mnist:$proxy_images" --proxy-hflip false \
      --target "idx:$data/fashion-mnist" --hflip \
      --teacher "$study/teacher-mnist-to-fmnist/last.safetensors" \
      --target-teacher "$study/teacher-target/last.safetensors" \
      --target-compression 64 --search-epochs 25 --search-step-epochs 10 \
      --finetune-epochs 3 --seed "$seed" ${variant#*:} \
      --out "$out/$name-seed$seed"
  done
done
python3 scripts/study-tables.py "$study" "$out"
