# Sourced by gpu_install.sh and gpu_check.sh: PYTHON, unless set, is the first of python3 and python on
# the PATH that imports torch (the GPU image's is python3); DEFAULT_SITE, where gpu_install.sh puts the
# wheels when the python's own site-packages is not writable.
if [ -z "${PYTHON:-}" ]; then
  for candidate in python3 python; do
    if command -v "$candidate" >/dev/null && "$candidate" -c "import torch" 2>/dev/null; then
      PYTHON=$(command -v "$candidate")
      break
    fi
  done
  [ -n "${PYTHON:-}" ] || { echo "$(basename "$0"): neither python3 nor python on the PATH imports torch; set PYTHON=..." >&2; exit 1; }
fi
DEFAULT_SITE=/tmp/ray-resnet-site
# an absolute SITE: the scripts change folder, and Ray's processes start in folders of their own
if [ -n "${SITE:-}" ]; then SITE=$(realpath -m "$SITE"); fi
