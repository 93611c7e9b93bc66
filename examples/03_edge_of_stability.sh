#!/usr/bin/env bash
# Edge of Stability: full-batch GD with a step large enough that 2/eta (25) is below the start
# checkpoint's sharpness (lambda_1 = 31.4), so GD must self-stabilise. GD vs Dom-GD vs Bulk-GD,
# sharpness logged beside 2/eta. The paper: Bulk-GD trains as well as GD; Dom-GD does not.
source "$(dirname "$0")/common.sh"
OUT=${OUT:-examples/out/03_edge_of_stability}
STEPS=${STEPS:-100}
LR=${LR:-0.08}
fresh_dir "$OUT"
for mode in none dom bulk; do
  subspace project-train $SAMPLES/mlp_mnist1d.safetensors --mode "$mode" --optimizer sgd \
    --lr "$LR" --batch-size full -k 10 --steps "$STEPS" --seed 0 "${audit[@]}" --out "$OUT/$mode" -q
done
subspace report "$OUT"/{none,dom,bulk} -o "$OUT/report"
finish "$OUT"
