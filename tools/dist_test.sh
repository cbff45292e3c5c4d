#!/usr/bin/env bash
# tools/dist_test.sh CONFIG CHECKPOINT GPUS [test.py args]; env NNODES, NODE_RANK, PORT,
# MASTER_ADDR, PYTHON. Without CUDA, tools/test.py switches the backend to gloo.
# Several nodes: as tools/dist_train.sh, one command per node with its NODE_RANK.

if [ $# -lt 3 ]; then
    echo "usage: [NNODES=1] [NODE_RANK=0] [PORT=29500] [MASTER_ADDR=127.0.0.1] [PYTHON=python] \\" >&2
    echo "       bash $0 CONFIG CHECKPOINT GPUS [test.py args]" >&2
    echo "error: CONFIG, CHECKPOINT and GPUS (processes per node) are required" >&2
    exit 2
fi

CONFIG=$1
CHECKPOINT=$2
GPUS=$3
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-"127.0.0.1"}
PYTHON=${PYTHON:-python}

PYTHONPATH="$(dirname "$0")/..":$PYTHONPATH \
"$PYTHON" -m torch.distributed.run \
    --nnodes=$NNODES \
    --node_rank=$NODE_RANK \
    --master_addr=$MASTER_ADDR \
    --nproc_per_node=$GPUS \
    --master_port=$PORT \
    "$(dirname "$0")/test.py" \
    "$CONFIG" \
    "$CHECKPOINT" \
    --launcher pytorch \
    "${@:4}"
