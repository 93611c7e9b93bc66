#!/usr/bin/env bash
# Sensitivity to k: Dom-SGD and Bulk-SGD with k = 2, 10 and 20 from the MLP sample (lr 0.01,
# batch 50), beside plain SGD. The paper: the conclusions do not depend on k near the number of
# classes.
source "$(dirname "$0")/common.sh"
OUT=${OUT:-examples/out/06_k_sweep}
STEPS=${STEPS:-40}
KS=${KS:-"2 10 20"}
fresh_dir "$OUT"
ckpt=$SAMPLES/mlp_mnist1d.safetensors
subspace project-train "$ckpt" --mode none --lr 0.01 --batch-size 50 -k 10 --steps "$STEPS" \
  --seed 0 --log-every 5 --out "$OUT/none" -q
runs=("$OUT/none")
for k in $KS; do
  for mode in dom bulk; do
    subspace project-train "$ckpt" --mode "$mode" --lr 0.01 --batch-size 50 -k "$k" \
      --steps "$STEPS" --seed 0 "${audit[@]}" --out "$OUT/${mode}_k$k" -q
    runs+=("$OUT/${mode}_k$k")
  done
done
subspace report "${runs[@]}" -o "$OUT/report"
finish "$OUT"
