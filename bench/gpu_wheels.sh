#!/usr/bin/env bash
# Download, on a machine with PyPI access, the wheels that bench/gpu_check.sh installs on the GPU machine
# (Python 3.12, x86-64, no network there). Writes .whl/ in the repo root (git-ignored).
#   bash bench/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -vE '^\s*(#|$)' bench/gpu_wheels.txt | while read -r spec; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_34_x86_64 \
    --platform manylinux_2_24_x86_64 --platform any -d .whl "$spec" || { echo "no wheel for $spec" >&2; exit 1; }
done
ls .whl | wc -l
