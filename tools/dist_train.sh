#!/usr/bin/env bash
# Data-parallel training on one machine (or one node of several): DDP, or FSDP with
# `strategy: fsdp` in the config (see README "Several processes and machines"):
#
#   tools/dist_train.sh CONFIG NPROC [train.py arguments...]
#
# runs `torchrun --nproc_per_node NPROC tools/train.py CONFIG --launcher pytorch ...`.
# Environment: PORT (master port, default 29500), NNODES (1), NODE_RANK (0),
# MASTER_ADDR (127.0.0.1), PYTHON (python). GPUs use NCCL, CPU-only machines gloo.
set -euo pipefail

if [ "$#" -lt 2 ]; then
    echo "usage: $0 CONFIG NPROC [train.py arguments...]" >&2
    exit 2
fi
CONFIG=$1
NPROC=$2
shift 2

TOOLS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON=${PYTHON:-python}

exec "$PYTHON" -m torch.distributed.run \
    --nnodes="${NNODES:-1}" \
    --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" \
    --master_port="${PORT:-29500}" \
    --nproc_per_node="$NPROC" \
    "$TOOLS_DIR/train.py" "$CONFIG" --launcher pytorch "$@"
