#!/usr/bin/env bash
# Creates .venv in the repository and installs vitasks into it.
#   bash tools/setup_env.sh        # the package (demo, training, tools)
#   bash tools/setup_env.sh dev    # plus the test-only peers (pytest, transformers, PyAV)
#   bash tools/setup_env.sh torch214   # .venv-torch214 instead: torch 2.14.1 + torchvision 0.29.1
#                                      # + timm and the dev peers (CI's second leg, .ci/run)
# The CPU build of torch is pinned and installed first: the project's own requirement is a range
# that 2.13.0 satisfies, so pip adds no CUDA build on top of it.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
if [ "$extra" = "torch214" ]; then
  # The newest torch in the supported range with the torchvision built for it (a CUDA build,
  # which also runs on the CPU) and timm, to compare the ops and converters with both for real.
  # Installed, it takes 6.6 GB (the CUDA libraries); pip stopping half-way with "No space left on
  # device" leaves a broken venv and says nothing about how much was needed, so check first
  # (unless the venv is there already: then pip has little left to write).
  need_kb=$((7 * 1024 * 1024))
  free_kb=$(df -Pk . | awk 'NR == 2 {print $4}')
  if [ ! -d .venv-torch214/lib ] && [ "${free_kb:-0}" -lt "$need_kb" ]; then
    echo "setup_env.sh torch214: .venv-torch214 needs about 7 GB free on the disk of $(pwd);" \
         "$((free_kb / 1024 / 1024)) GB free. Free some space (old clones, /tmp) and run it again." >&2
    exit 1
  fi
  python3 -m venv .venv-torch214
  echo '*' > .venv-torch214/.gitignore  # git (and copies of the work tree) leave it out
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  .venv-torch214/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" "timm==1.0.31"
  .venv-torch214/bin/python -m pip install -q -e ".[dev]"
  echo "vitasks installed in $(pwd)/.venv-torch214"
  exit 0
fi
python3 -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q "torch==2.13.0"
if [ "$extra" = "dev" ]; then
  .venv/bin/python -m pip install -q -e ".[dev]"
else
  .venv/bin/python -m pip install -q -e .
fi
echo "vitasks installed in $(pwd)/.venv"
