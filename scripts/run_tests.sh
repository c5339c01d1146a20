#!/usr/bin/env bash
# The README's test command: install with the test extra, then run the whole suite (extra pytest args pass through).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/bootstrap.sh" "test"
cd "$ROOT"
exec .venv/bin/python -m pytest -q --durations=15 "$@"
