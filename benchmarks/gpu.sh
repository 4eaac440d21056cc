#!/usr/bin/env bash
# The GPU run (see benchmarks/gpu.py): from the repository root, with the Python on
# PATH (or $PYTHON). Extra arguments go to gpu.py, e.g. `--out out/gpu --quick`.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" benchmarks/gpu.py "$@"
