#!/usr/bin/env bash
# Momentum and Adam: effective learning rates eta_dom and eta_bulk of the update (the paper's
# Table 1 averages them over the first 1000 steps and finds that momentum and Adam amplify the
# bulk component: eta_bulk > eta_dom). Unprojected runs from the MLP sample, logged every step
# (LOG_EVERY=5 for the earlier runs of docs/REPRODUCTION.md).
# docs/REPRODUCTION.md ran STEPS=1000, the paper's window (about 40 minutes per run on a CPU core).
source "$(dirname "$0")/common.sh"
OUT=${OUT:-examples/out/05_momentum_adam}
STEPS=${STEPS:-250}
fresh_dir "$OUT"
ckpt=$SAMPLES/mlp_mnist1d.safetensors
common=(--mode none --batch-size 50 -k 10 --steps "$STEPS" --seed 0 --log-every "${LOG_EVERY:-1}"
        "${audit[@]}" -q)
subspace project-train "$ckpt" --optimizer sgd --lr 0.01 "${common[@]}" --out "$OUT/sgd"
subspace project-train "$ckpt" --optimizer momentum --momentum 0.9 --lr 0.001 "${common[@]}" \
  --out "$OUT/momentum"
subspace project-train "$ckpt" --optimizer adam --lr 0.0001 "${common[@]}" --out "$OUT/adam"
subspace report "$OUT"/{sgd,momentum,adam} -o "$OUT/report"
finish "$OUT"
