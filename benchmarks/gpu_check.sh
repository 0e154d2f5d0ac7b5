#!/usr/bin/env bash
# The GPU check in one command, where the GPU is: installs the wheels carried in benchmarks/wheels
# (made by benchmarks/gpu_wheels.sh) when Ray, MLflow or pydantic is missing, then runs every row
# of benchmarks/gpu_throughput.py, stopped after LIMIT_S seconds (default 450: the whole check
# within 8 minutes). With OUT set, its output is also written to $OUT/gpu_throughput.txt, and the
# product's profile (--profile) into $OUT.
#   benchmarks/gpu_check.sh [gpu_throughput.py's flags, e.g. --rows 5,6]
#   WHEELS=DIR  PYTHON=... (default: the first of python3, python that imports torch)  LIMIT_S=...  SITE=...
set -euo pipefail

case "${1:-}" in -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac
ROOT=$(cd "$(dirname "$0")/.." && pwd)
source "$ROOT/benchmarks/gpu_python.sh"
WHEELS=${WHEELS:-$ROOT/benchmarks/wheels}
# Ray's worker processes import pipelines too (the setup hook, the decode tasks): from this checkout;
# and the wheels from SITE where gpu_install.sh had to put them there
export PYTHONPATH="$ROOT:${SITE:-$DEFAULT_SITE}${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PYTHON" -c "import ray, mlflow, pydantic" 2>/dev/null; then
  PYTHON=$PYTHON bash "$ROOT/benchmarks/gpu_install.sh" "$WHEELS"
fi
cd "$ROOT"
# what the figures are read with; neither stops the check
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
# Ray's object store lives in /dev/shm when it has room, else in /tmp
{ df -h /dev/shm 2>/dev/null | tail -n 1 | awk '{print "/dev/shm: " $2 " (" $4 " free)"}'; } || true
log=/dev/null
if [ -n "${OUT:-}" ]; then  # the output, and the product's profile (row 4): what comes back from the GPU machine
  log=$OUT/gpu_throughput.txt
  set -- --profile "$OUT" "$@"
fi
timeout "${LIMIT_S:-450}" "$PYTHON" benchmarks/gpu_throughput.py "$@" 2>&1 | tee "$log"
