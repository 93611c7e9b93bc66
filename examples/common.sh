# Sourced by the example scripts: strict mode, the output folder, and a timer.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SAMPLES=sample_checkpoints
fresh_dir() {  # fresh_dir DIR: refuse to mix with the results of an earlier run
  if [ -e "$1" ]; then
    echo "error: $1 exists; remove it (or set OUT=another/folder) to run the experiment again" >&2
    exit 2
  fi
  mkdir -p "$1"
}
# Every run that keeps a subspace is audited every AUDIT steps (0: never): a cold tight solve
# measures the overlap of the tracked subspace with the exact one (subspace report: "audit min").
AUDIT=${AUDIT:-50}
audit=(--audit-every "$AUDIT")
SECONDS=0
finish() { echo "done in ${SECONDS} s; plots and tables in $1" >&2; }
