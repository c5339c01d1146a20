#!/usr/bin/env bash
# Create .venv and install the project into it (with the extras named in $1, e.g. "test").
# Reinstalls only when pyproject.toml changed since the last install. Sourced by run_demo.sh / run_tests.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRAS="${1:-}"
PY="${PYTHON:-python3}"
cd "$ROOT"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
SPEC="."
[ -n "$EXTRAS" ] && SPEC=".[$EXTRAS]"
STAMP=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)-${EXTRAS:-base}"
if [ ! -f "$STAMP" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    # torch is pinned to a CPU-installable release in pyproject.toml; name it first so pip never
    # resolves a multi-gigabyte CUDA build on a CPU machine.
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
    .venv/bin/python -m pip install --quiet -e "$SPEC"
    touch "$STAMP"
fi
