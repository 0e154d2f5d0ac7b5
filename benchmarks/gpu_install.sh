#!/usr/bin/env bash
# Installs, without network, the wheels benchmarks/gpu_wheels.sh downloaded into DIR
# (benchmarks/gpu_requirements.txt and their dependencies) beside the GPU image's torch,
# torchvision, numpy, pyarrow, pandas, scikit-learn and Pillow, and this checkout (editable, no
# dependencies); then prints the versions that import and which image decoder pipelines.codecs loads.
# Where the python's site-packages is not writable (a non-root user), or with SITE set, the wheels go
# into SITE (default /tmp/ray-resnet-site) instead, to be put on PYTHONPATH (gpu_check.sh does).
#   benchmarks/gpu_install.sh DIR        PYTHON=... (default: the first of python3, python that imports torch)
set -euo pipefail

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; }
case "${1:-}" in -h|--help) usage; exit 0 ;; "") usage >&2; exit 2 ;; esac
[ $# -eq 1 ] || { usage >&2; exit 2; }
DIR=$1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
source "$ROOT/benchmarks/gpu_python.sh"

[ -d "$DIR" ] || { echo "gpu_install.sh: no folder $DIR" >&2; exit 2; }
# gpu_wheels.sh recompresses the wheels with LZMA: pip reads them through zipfile, which needs lzma
"$PYTHON" -c "import lzma" 2>/dev/null \
  || { echo "gpu_install.sh: $PYTHON has no lzma module; it cannot unpack these wheels" >&2; exit 1; }
PURELIB=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
if [ -z "${SITE:-}" ] && [ -w "$PURELIB" ]; then
  # A distribution's python (PEP 668) refuses pip installs outside a venv; the GPU machine is throwaway
  if "$PYTHON" -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))'; then
    echo "gpu_install.sh: $PYTHON is marked externally managed; installing with PIP_BREAK_SYSTEM_PACKAGES=1" >&2
    export PIP_BREAK_SYSTEM_PACKAGES=1
  fi
  "$PYTHON" -m pip install --disable-pip-version-check --no-index --find-links "$DIR" \
    -r "$ROOT/benchmarks/gpu_requirements.txt"
  # Ray's workers start outside the checkout and import pipelines (the setup hook in
  # pipelines/runtime.py): without this they fail, and Ray Data retries their tasks forever.
  # --no-deps: the image's torch stays, and there is no torchcodec or full mlflow to find.
  "$PYTHON" -m pip install --disable-pip-version-check --quiet --no-index --no-deps --no-build-isolation -e "$ROOT" \
    || echo "gpu_install.sh: could not install $ROOT itself; run with PYTHONPATH=$ROOT" >&2
else
  # Every wheel, without resolving: DIR holds the whole closure but for the image's packages
  # (gpu_wheels.sh). Ray's workers find these and the checkout through PYTHONPATH, which they inherit.
  SITE=${SITE:-$DEFAULT_SITE}
  echo "gpu_install.sh: ${PURELIB} is not writable here (or SITE is set): installing into $SITE" >&2
  "$PYTHON" -m pip install --disable-pip-version-check --quiet --no-index --no-deps --upgrade \
    --target "$SITE" "$DIR"/*.whl
  export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
  echo "gpu_install.sh: put $SITE on PYTHONPATH (gpu_check.sh does)"
fi

cd "$ROOT"
"$PYTHON" - <<'PY'
import warnings
warnings.simplefilter("ignore")
import mlflow, pydantic, ray, torch, torchvision
from pipelines import codecs
for module in (ray, mlflow, pydantic, torch, torchvision):
    print(f"{module.__name__} {module.__version__}")
print(f"image decoder: {codecs.DECODER}")
PY
