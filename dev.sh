#!/usr/bin/env bash
# One command per job on a fresh checkout: creates (or reuses) .venv/ with the pinned package set,
# then runs the job.
#   ./dev.sh train [key=value ...]   train on ray_config.yaml (overrides as for pipelines.train)
#   ./dev.sh test  [pytest args ...] the whole test suite
set -euo pipefail
cd "$(dirname "$0")"
usage="usage: ./dev.sh train [key=value ...] | ./dev.sh test [pytest args ...]"
case "${1:-}" in -h|--help|help) sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'; echo "$usage"; exit 0 ;; esac

PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
stamp=".venv/.installed-$(cat constraints.txt pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  echo "dev.sh: installing the pinned packages into .venv (first run: a few minutes)" >&2
  .venv/bin/python -m pip install --quiet --disable-pip-version-check \
    -c constraints.txt -e '.[test]'
  rm -f .venv/.installed-* && touch "$stamp"
fi

job=${1:-}
shift || true
case "$job" in
  train) exec .venv/bin/python -m pipelines.train --config ray_config.yaml "$@" ;;
  test)  exec .venv/bin/python -m pytest "$@" ;;
  *) echo "$usage" >&2; exit 2 ;;
esac
