#!/usr/bin/env bash
# One entry point for a fresh machine: finds Python 3.12, makes .venv, installs bitgen, then
#   bash launch/local.sh main   trains the tiny BSQ-ViT on the embedded photos and evaluates it
#   bash launch/local.sh test   runs the CPU test suite (what CI runs)
# Extra arguments go to the command (e.g. `main --workdir runs/x`, `test -k bits`).
set -euo pipefail
cd "$(dirname "$0")/.."

find_python312() {
  local c
  for c in python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      command -v "$c"; return 0
    fi
  done
  echo "bitgen needs Python 3.12 (python3.12 was not found)" >&2; return 1
}

setup() {
  local extras=$1 stamp=".venv/.installed-${1:-base}" spec=.
  [ -n "$extras" ] && spec=".[$extras]"
  if [ ! -x .venv/bin/python ]; then "$(find_python312)" -m venv .venv; fi
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e "$spec"
    touch "$stamp"
  fi
}

cmd=${1:-}; shift || true
case "$cmd" in
  main)
    setup ""
    exec .venv/bin/python -m bitgen main "$@" ;;
  test)
    setup test
    set +e
    .venv/bin/python -m pytest -m "not gpu and not slow and not tpu_compile" --durations=15 "$@"
    rc=$?
    [ $rc -eq 5 ] && { echo "no tests collected" >&2; exit 1; }
    exit $rc ;;
  *)
    echo "usage: bash launch/local.sh main|test [args...]" >&2; exit 2 ;;
esac
