#!/usr/bin/env bash
# The torchvision zoo through gmpq, end to end: each CNN exported to ONNX by both of torch's
# exporters (scripts/onnx_zoo.py), imported (and checked against ONNX Runtime on the same
# file), trained one epoch on the proxy data, searched one epoch, fine-tuned one epoch with
# integer numerics, exported as an integer ONNX model, and compared with ONNX Runtime; then
# ONNX Runtime's integer and FP32 speed at batch 64 and the ops of its optimized integer graph
# that compute in float (`bench infer`'s integer_float_ops: ops on uint8 codes, such as a
# concat or transpose of codes, are not counted). One JSON line per model in OUT/zoo.jsonl and
# a Markdown table in OUT/zoo.md.
#
#   bash scripts/zoo.sh [OUT] [MODELS]     (default runs/zoo, the whole zoo; GMPQ_BIN=PATH runs
#                                           that binary instead of building this checkout)
#
# The networks start from random weights (the point is that every command runs on every
# graph and computes what ONNX Runtime computes), so their accuracies mean nothing.
# Resumable: a model whose line is in zoo.jsonl is skipped.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$(realpath -m "${1:-runs/zoo}")"
models="${2:-resnet18,mobilenet_v2,mobilenet_v3_small,shufflenet_v2_x0_5,squeezenet1_1,regnet_y_400mf,efficientnet_b0,mnasnet0_5,densenet121,googlenet}"
data="${GMPQ_ZOO_DATA:-bundled:mnist}"
bash "$root/scripts/setup.sh"
source "$root/scripts/env.sh"
cd "$root"
# GMPQ_BIN: a gmpq binary to run instead of building this checkout's.
gmpq="${GMPQ_BIN:-}"
if [ -z "$gmpq" ]; then
  cargo build --release --quiet
  gmpq="$root/target/release/gmpq"
fi
mkdir -p "$out/onnx"
touch "$out/zoo.jsonl"
# One model through the chain; its JSON line goes to zoo.jsonl.
run_one() {
  local name="$1"
  onnx="$out/onnx/$name.onnx"
  [ -f "$onnx" ] || .venv/bin/python scripts/onnx_zoo.py --out "$out/onnx" --models "$model" --exporters "$exporter" >/dev/null
  dir="$out/$name"
  rm -rf "$dir"; mkdir -p "$dir"
  check="$("$gmpq" import --onnx "$onnx" --out "$dir/imported.safetensors" --mean 0.5,0.5,0.5 --std 0.25,0.25,0.25 | grep 'checked against')"
  fp_diff="$(sed -E 's/.*difference ([^ ]+) of.*/\1/' <<<"$check")"
  common=(--threads 2)
  "$gmpq" "${common[@]}" train --init "$dir/imported.safetensors" --data "$data" --limit 512 --test-limit 500 \
    --epochs 1 --batch-size 64 --lr 0.01 --out "$dir/fp" >/dev/null 2>"$dir/train.log" || { tail -1 "$dir/train.log" >&2; return 1; }
  "$gmpq" "${common[@]}" search --teacher "$dir/fp/last.safetensors" --data "$data" --limit 256 --val-images 64 \
    --epochs 1 --batch-size 64 --target-compression 8 --out "$dir/search" >/dev/null 2>"$dir/search.log" || { tail -1 "$dir/search.log" >&2; return 1; }
  "$gmpq" "${common[@]}" finetune --init "$dir/fp/last.safetensors" --policy "$dir/search/policy.json" \
    --data "$data" --limit 512 --test-limit 500 --epochs 1 --batch-size 64 --out "$dir/finetune" >/dev/null 2>"$dir/finetune.log" || { tail -1 "$dir/finetune.log" >&2; return 1; }
  "$gmpq" export --checkpoint "$dir/finetune/last.safetensors" --out "$dir/integer.onnx" >/dev/null
  compared="$("$gmpq" eval --checkpoint "$dir/finetune/last.safetensors" --onnx "$dir/integer.onnx" --data "$data" --test-limit 1000)"
  agreement="$(sed -nE 's/.*same top-1 class on ([0-9.]+)%.*/\1/p' <<<"$compared")"
  top1="$(sed -nE 's/.*top-1 ([0-9.]+)% vs.*/\1/p' <<<"$compared")"
  logit_diff="$(sed -nE 's/.*largest logit difference ([^ ,]+).*/\1/p' <<<"$compared")"
  bench="$("$gmpq" --threads 2 bench infer --checkpoint "$dir/imported.safetensors" --batch-sizes 64 --steps 10 --json 2>/dev/null)"
  layers="$(jq '.layers | length' "$dir/search/policy.json")"
  jq -c --arg name "$name" --arg fp "$fp_diff" --arg agree "$agreement" --arg top1 "$top1" --arg ld "$logit_diff" \
    --argjson layers "$layers" '{
      name: $name,
      fp_relative_difference: ($fp | tonumber),
      quantized_layers: $layers,
      qlinearconv: (.integer_optimized_ops.QLinearConv // 0),
      float_ops: (.integer_float_ops | to_entries | map("\(.key) \(.value)") | join(", ")),
      ort_integer_over_fp32: ((.results[] | select(.engine == "onnxruntime integer") | .images_per_second)
        / (.results[] | select(.engine == "onnxruntime fp32") | .images_per_second)),
      top1_agreement: ($agree | tonumber),
      largest_logit_difference: ($ld | tonumber),
      integer_top1: ($top1 | tonumber),
      cpu: .cpu.model
    }' <<<"$bench" >>"$out/zoo.jsonl"
}

for model in ${models//,/ }; do
  for exporter in torchscript dynamo; do
    name="$model-$exporter"
    if grep -q "\"name\":\"$name\"" "$out/zoo.jsonl"; then continue; fi
    # A failure is a row of the table (its last message), not the end of the run. (Not in
    # an `if`: bash would ignore set -e inside.)
    echo "== $name" >&2
    set +e
    (set -e; run_one "$name" 2>"$out/$name.err")
    status=$?
    set -e
    if [ "$status" != 0 ]; then
      jq -cn --arg name "$name" --arg error "$(tail -1 "$out/$name.err")" '{name: $name, error: $error}' >>"$out/zoo.jsonl"
    fi
  done
done
{
  echo "| model | FP vs ONNX Runtime (relative) | quantized layers | QLinearConv | float ops left | ORT integer / FP32 (batch 64) | integer top-1 (gmpq) | top-1 agreement | largest logit difference |"
  echo "|---|---|---|---|---|---|---|---|---|"
  jq -r 'if .error then "| \(.name) | \(.error) | | | | | | | |" else "| \(.name) | \(.fp_relative_difference) | \(.quantized_layers) | \(.qlinearconv) | \(.float_ops) | \(.ort_integer_over_fp32 * 100 | round / 100)× | \(.integer_top1) % | \(.top1_agreement) % | \(.largest_logit_difference) |" end' "$out/zoo.jsonl"
} >"$out/zoo.md"
cat "$out/zoo.md"
