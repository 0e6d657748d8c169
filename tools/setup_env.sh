#!/usr/bin/env bash
# Creates .venv in the repository and installs vitasks into it.
#   bash tools/setup_env.sh        # the package (demo, training, tools)
#   bash tools/setup_env.sh dev    # plus the test-only peers (pytest, transformers, PyAV)
# The CPU build of torch is pinned and installed first: the project's own requirement is a range
# that 2.13.0 satisfies, so pip adds no CUDA build on top of it.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
python3 -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q "torch==2.13.0"
if [ "$extra" = "dev" ]; then
  .venv/bin/python -m pip install -q -e ".[dev]"
else
  .venv/bin/python -m pip install -q -e .
fi
echo "vitasks installed in $(pwd)/.venv"
