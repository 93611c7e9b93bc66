#!/usr/bin/env bash
# SAM: SAM vs Dom-SAM vs Bulk-SAM from the MLP sample (lr 0.01, batch 50, rho 0.05).
# The paper: Bulk-SAM matches SAM, Dom-SAM stalls.
source "$(dirname "$0")/common.sh"
OUT=${OUT:-examples/out/04_sam}
STEPS=${STEPS:-100}
fresh_dir "$OUT"
for mode in none dom bulk; do
  log_every=1; [ "$mode" = none ] && log_every=5
  subspace project-train $SAMPLES/mlp_mnist1d.safetensors --mode "$mode" --optimizer sam \
    --rho 0.05 --lr 0.01 --batch-size 50 -k 10 --steps "$STEPS" --seed 0 \
    --log-every "$log_every" --out "$OUT/$mode" -q
done
subspace report "$OUT"/{none,dom,bulk} -o "$OUT/report"
finish "$OUT"
