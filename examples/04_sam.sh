#!/usr/bin/env bash
# SAM: SAM vs Dom-SAM vs Bulk-SAM (rho 0.05, lr 0.01, batch 50). The paper: Bulk-SAM matches SAM,
# Dom-SAM stalls.
# The MLP sample was trained with plain SGD, and from there SAM first *raises* the training loss
# for a few hundred steps (it trades loss for flatness). So, as in the paper, the switch comes
# after SAM training: stage 1 trains the sample with unprojected SAM for PRE_STEPS steps (k 0: no
# Hessian is needed, under a minute); stage 2 resumes from its last checkpoint with SAM, Dom-SAM
# and Bulk-SAM for STEPS steps, the subspace recomputed every step.
source "$(dirname "$0")/common.sh"
OUT=${OUT:-examples/out/04_sam}
PRE_STEPS=${PRE_STEPS:-1000}
STEPS=${STEPS:-100}
fresh_dir "$OUT"
sam=(--optimizer sam --rho 0.05 --lr 0.01 --batch-size 50 --seed 0 -q)
subspace project-train $SAMPLES/mlp_mnist1d.safetensors --mode none -k 0 --steps "$PRE_STEPS" \
  --log-every 50 --out "$OUT/pretrain" "${sam[@]}"
for mode in none dom bulk; do
  log_every=1; [ "$mode" = none ] && log_every=5
  subspace project-train "$OUT/pretrain/last.safetensors" --mode "$mode" -k 10 \
    --steps "$STEPS" --log-every "$log_every" "${audit[@]}" --out "$OUT/$mode" "${sam[@]}"
done
subspace report "$OUT"/{none,dom,bulk} -o "$OUT/report"
finish "$OUT"
