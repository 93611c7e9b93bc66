#!/usr/bin/env bash
# The first thing to run on a CUDA machine (meant to fit in 8 minutes on an H100/H200, not yet
# run on one; nothing is downloaded). It
#   1. installs the working tree into a venv beside the machine's own torch (offline; wheels of
#      packages the machine lacks, e.g. mnist1d and the peers, are taken from .whl/ if present),
#   2. runs the tests marked `cuda`,
#   3. runs spectrum, align and a 20-step project-train on CUDA and on the CPU and compares them
#      (benchmarks/gpu_compare.py: eigenvalues to 1e-4 relative, overlaps >= 0.999),
#   4. runs the spectrum benchmark on CUDA (benchmarks/spectrum_peers.py --device cuda) for the
#      tools that are installed,
#   5. times the data-parallel path with one process (NCCL) against the plain one
#      (benchmarks/distributed_scaling.py).
# Every section prints its result; the exit code is 1 if any section failed.
# The GPU machine cannot download. Prepare the wheels it lacks here, once (all pure Python):
#   echo /.whl/ >> .git/info/exclude
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl mnist1d pyhessian==0.1 hessian-eigenthings==1.0.0a5 \
#     curvlinops-for-pytorch==3.0.1 backpack-for-pytorch==1.7.1 unfoldNd einconv
# and run it through the device tool with carry [".whl"], timeout_s 600:
#   benchmarks/gpu_check.sh                 # results also under $OUT (default /tmp/gpu_check)
#   DEVICE=cpu benchmarks/gpu_check.sh      # a dry run of the script's logic without a GPU
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
VENV=${VENV:-/tmp/gpu_check_venv}
BENCH_TOOLS=${BENCH_TOOLS:-ours,arpack,pyhessian,eigenthings,eigenthings-defaults,curvlinops}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 SUBSPACE_CACHE_DIR="$OUT/cache"
status=0
section() { echo; echo "== $* ($(date +%T))"; }
failed() { echo "FAILED: $*"; status=1; }

section machine
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
  || echo "no nvidia-smi"
"$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"

section "install (offline, beside the machine's torch)"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv --system-site-packages "$VENV" || { echo "cannot create $VENV"; exit 2; }
fi
if compgen -G ".whl/*.whl" > /dev/null; then
  "$VENV/bin/python" -m pip install -q --no-index --no-deps .whl/*.whl || failed "wheels"
fi
"$VENV/bin/python" -m pip install -q --no-index --no-deps --no-build-isolation -e . -e ./plugins \
  || { echo "install of the working tree failed"; exit 2; }
"$VENV/bin/python" -c "import torch, subspace_cli, subspace_plugins; print('installed; torch',
torch.__version__)" || exit 2

section "tests marked cuda"
if [ "$DEVICE" = cpu ]; then
  echo "skipped (DEVICE=cpu)"
else
  timeout 240 "$VENV/bin/python" -m pytest -q -m cuda -p no:cacheprovider tests 2>&1 | tail -25
  [ "${PIPESTATUS[0]}" -eq 0 ] || failed "cuda tests"
fi

section "spectrum, align, project-train: $DEVICE against cpu"
timeout 240 "$VENV/bin/python" benchmarks/gpu_compare.py --device "$DEVICE" --against cpu \
  --out "$OUT" || failed "comparison"

section "spectrum benchmark on $DEVICE"
for case in mlp cnn wide; do  # one case at a time, so that a slow one leaves the others' tables
  timeout "${BENCH_SECONDS:-150}" "$VENV/bin/python" benchmarks/spectrum_peers.py \
    --device "$DEVICE" --threads 4 --only "$case" --tools "$BENCH_TOOLS" --repeat 1 \
    --cache "$OUT/bench" --json "$OUT/bench_$case.json" 2> "$OUT/bench_$case.err" \
    || { tail -5 "$OUT/bench_$case.err"; failed "benchmark $case"; }
done

section "data-parallel path on $DEVICE: torchrun with one process (NCCL) against none"
timeout 150 "$VENV/bin/python" benchmarks/distributed_scaling.py --device "$DEVICE" \
  --launches plain-1,torchrun-1 || failed "distributed scaling"

section "done: exit $status"
exit $status
