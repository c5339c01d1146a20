#!/usr/bin/env bash
# Create .venv and install the project into it (with the extras named in $1, e.g. "test").
# Reinstalls only when pyproject.toml changed since the last install. Run by run_demo.sh and run_tests.sh.
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
HASH="$(sha256sum pyproject.toml | cut -c1-16)"
STAMP=".venv/.installed-$HASH-${EXTRAS:-base}"
# An install with any extras covers the base install.
if [ -z "$EXTRAS" ] && ls .venv/.installed-"$HASH"-* >/dev/null 2>&1; then
    exit 0
fi
if [ ! -f "$STAMP" ]; then
    # torch is pinned in pyproject.toml; it is named first so that the build pip's configuration provides (a
    # local CPU wheel on this project's machines) is taken before the project's dependencies resolve one.
    # PyPI's Linux wheels are CUDA builds (several GB): TORCH_INDEX_URL (say https://download.pytorch.org/whl/cpu)
    # names another index for it.
    .venv/bin/python -m pip install --quiet ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==2.13.0"
    .venv/bin/python -m pip install --quiet -e "$SPEC"
    touch "$STAMP"
fi
