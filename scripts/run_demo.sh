#!/usr/bin/env bash
# The README's run command: install, then stream a chat completion through both services on a demo model
# built locally (or pass --model DIR for a real Hugging Face model directory).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/bootstrap.sh" ""
cd "$ROOT"
exec .venv/bin/python -m scripts.demo "$@"
