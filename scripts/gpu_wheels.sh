#!/usr/bin/env bash
# The Python packages the GPU machine's image lacks (docs/GPU.md), for scripts/gpu_check.sh part s, which starts
# both services: grpcio-health-checking and grpcio-reflection at the versions pyproject.toml pins. Both are pure
# Python: their wheels are downloaded (no dependencies: grpcio and protobuf are on the image) and unpacked into
# .whl/site, which git ignores and gpu_check.sh puts on PYTHONPATH. Run it where pip reaches PyPI, then carry
# .whl with the device tool.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY=${PYTHON:-python3}
pins=()
for name in grpcio-health-checking grpcio-reflection; do
    pin=$(grep -o "\"$name==[^\"]*\"" pyproject.toml | tr -d '"') || true
    if [[ -z $pin ]]; then
        echo "gpu_wheels: pyproject.toml pins no exact version of $name (expected \"$name==X.Y.Z\")" >&2
        exit 1
    fi
    pins+=("$pin")
done
rm -rf .whl
mkdir -p .whl/wheels .whl/site
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest .whl/wheels "${pins[@]}"
for wheel in .whl/wheels/*.whl; do
    "$PY" -m zipfile -e "$wheel" .whl/site
done
echo "gpu_wheels: ${pins[*]} unpacked into .whl/site ($(du -sh .whl | cut -f1)); carry .whl"
