#!/usr/bin/env bash
# The README's test command: install with the test extra, then run the whole suite (extra pytest args pass through).
#
# Triton picks its interpreter once per process, before any kernel is decorated. Without CUDA the whole suite
# runs in one pytest run with the interpreter (tests/conftest.py sets TRITON_INTERPRET=1; tests/gpu skip). With
# CUDA and no arguments it runs twice: everything but tests/gpu with TRITON_INTERPRET=1 (the CPU kernel tests),
# then tests/gpu with compiled kernels.
#
# The suite runs on PYTEST_WORKERS processes (pytest-xdist; default 2, CI's two cores, on which the suite takes 10-15
# minutes). PYTEST_WORKERS=0 runs it in this one process (so does --pdb); a -n among the arguments overrides it.
# tests/conftest.py gives each worker a temp directory of its own. tests/gpu runs in one process: its tests share
# the one device.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/bootstrap.sh" "test"
cd "$ROOT"
PY=.venv/bin/python
WORKERS="${PYTEST_WORKERS:-2}"
for arg in "$@"; do
    case $arg in --pdb | --trace) WORKERS=0 ;; esac  # xdist refuses a debugger in its workers
done
# A worker that dies (a test that ends its process) fails the run at once, naming the test: replaced, one left
# xdist's file scheduler waiting forever for the crashed worker's files (a hang of the whole CI run).
SUITE=(-q -n "$WORKERS" --dist loadfile --max-worker-restart=0 --durations=15)
if [ $# -eq 0 ] && "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "run_tests: CUDA found; the CPU suite (Triton interpreter), then tests/gpu (compiled kernels)"
    rc=0
    TRITON_INTERPRET=1 "$PY" -m pytest "${SUITE[@]}" --ignore=tests/gpu || rc=$?
    env -u TRITON_INTERPRET "$PY" -m pytest -q tests/gpu || rc=$?
    exit "$rc"
fi
# No CUDA, or pytest arguments given (on a CUDA machine without TRITON_INTERPRET=1 in the environment, the
# CPU kernel tests then skip and say why).
exec "$PY" -m pytest "${SUITE[@]}" "$@"
