#!/usr/bin/env bash
# Figure 1 of the paper: resume SGD from a trained checkpoint as plain SGD, Dom-SGD (every update
# projected onto the top-k Hessian eigenspace) and Bulk-SGD (onto its complement), the subspace
# recomputed from the full-training-set Hessian at every step.
#   examples/01_figure1.sh [mlp|cnn|transformer|resnet ...]   (default: all four)
# Cost on a 2-core CPU: mlp and cnn about 10 to 20 minutes each at the default 100 steps. The
# transformer is slow on a CPU: one Hessian-vector product over its 1,000 sequences takes about
# 2.7 s on a core (reverse-loop). With the tracker its projected runs take 10 to 15 s a step:
# `STEPS=300 examples/01_figure1.sh transformer` and `STEPS=2000 examples/01_figure1.sh mlp` are
# the runs in docs/REPRODUCTION.md (started two at a time there, one torch thread each).
# Settings as the samples were trained: SGD, lr 0.01 (the ResNet-8: 0.05), batch 50, seed 0.
# k = 10 = number of classes for all four (MNIST-1D and digits have 10 classes; the paper's
# k = 2 for the transformer is SST-2's two classes). The ResNet-8 has BatchNorm: its training
# steps run in train mode and every measurement in eval mode (README, "BatchNorm and dropout").
source "$(dirname "$0")/common.sh"
OUT=${OUT:-examples/out/01_figure1}
STEPS=${STEPS:-100}
declare -A CKPT=([mlp]=mlp_mnist1d [cnn]=cnn_digits [transformer]=transformer_mnist1d
                 [resnet]=resnet_digits)
declare -A LR=([mlp]=0.01 [cnn]=0.01 [transformer]=0.01 [resnet]=0.05)
setups=("$@"); [ ${#setups[@]} -gt 0 ] || setups=(mlp cnn transformer resnet)
fresh_dir "$OUT"
for setup in "${setups[@]}"; do
  ckpt=$SAMPLES/${CKPT[$setup]}.safetensors
  for mode in none dom bulk; do
    # the unprojected run needs the subspace only for its logged chi: log every 5 steps
    log_every=1; [ "$mode" = none ] && log_every=5
    subspace project-train "$ckpt" --mode "$mode" --optimizer sgd --lr "${LR[$setup]}" --batch-size 50 \
      -k 10 --steps "$STEPS" --seed 0 --log-every "$log_every" "${audit[@]}" --out "$OUT/$setup/$mode" -q
  done
  subspace report "$OUT/$setup"/{none,dom,bulk} -o "$OUT/$setup/report"
done
finish "$OUT"
