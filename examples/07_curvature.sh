#!/usr/bin/env bash
# Which curvature should the dominant subspace come from? Dom-SGD and Bulk-SGD on the MLP sample
# with the top-10 eigenspace of the Hessian, of the Gauss-Newton matrix (ggn) and of the
# covariance of the batch-50 gradient (gradient-covariance: DOME's subspace), each tracked and
# audited as in 01_figure1.sh, beside plain SGD, all from the same checkpoint and seed (so the
# same mini-batches).
#   examples/07_curvature.sh [none] [hessian] [ggn] [gradient-covariance]   (default: all)
# STEPS (default 300) steps each; OUT (default examples/out/07_curvature) must not exist unless
# only some runs are asked for (then the others' folders must not).
# Cost on a 2-core CPU with one torch thread a run: 3 to 5 minutes for SGD and the Hessian and
# GGN runs, 13 to 17 for the gradient-covariance runs (their subspace moves faster).
source "$(dirname "$0")/common.sh"
OUT=${OUT:-examples/out/07_curvature}
STEPS=${STEPS:-300}
ckpt=$SAMPLES/mlp_mnist1d.safetensors
runs=("$@"); [ ${#runs[@]} -gt 0 ] || { fresh_dir "$OUT"; runs=(none hessian ggn gradient-covariance); }
mkdir -p "$OUT"
common=(--optimizer sgd --lr 0.01 --batch-size 50 -k 10 --steps "$STEPS" --seed 0 "${audit[@]}" -q)
for run in "${runs[@]}"; do
  if [ "$run" = none ]; then
    subspace project-train "$ckpt" --mode none --log-every 5 "${common[@]}" --out "$OUT/none"
    continue
  fi
  for mode in dom bulk; do
    subspace project-train "$ckpt" --mode "$mode" --curvature "$run" --log-every 5 \
      "${common[@]}" --out "$OUT/$run-$mode"
  done
done
if [ -d "$OUT/none" ] && [ "$(ls -d "$OUT"/*-bulk 2>/dev/null | wc -l)" -eq 3 ]; then
  subspace report "$OUT"/none "$OUT"/{hessian,ggn,gradient-covariance}-{dom,bulk} -o "$OUT/report"
fi
finish "$OUT"
