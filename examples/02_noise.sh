#!/usr/bin/env bash
# Noise: is the gradient's alignment with the dominant subspace a product of SGD noise?
# From the MLP sample: chi_k of mini-batch gradients against batch size (align), then plain SGD
# (batch 50) against full-batch GD with the same small step (lr 0.01), chi_k logged every 5 steps.
# The paper: alignment is high under SGD and disappears under GD with a small step.
source "$(dirname "$0")/common.sh"
OUT=${OUT:-examples/out/02_noise}
STEPS=${STEPS:-300}
fresh_dir "$OUT"
ckpt=$SAMPLES/mlp_mnist1d.safetensors
subspace align "$ckpt" -k 10 --batch-size 10 --batch-size 50 --batch-size 500 \
  --batch-size 2500 --batches 100 -o "$OUT/spectra.h5" -q
for bs in 50 full; do
  subspace project-train "$ckpt" --mode none --optimizer sgd --lr 0.01 --batch-size "$bs" \
    -k 10 --steps "$STEPS" --seed 0 --log-every 5 --out "$OUT/batch_$bs" -q
done
subspace report "$OUT/batch_50" "$OUT/batch_full" "$OUT/spectra.h5" -o "$OUT/report"
finish "$OUT"
