#!/usr/bin/env bash
# tools/dist_train.sh CONFIG GPUS [train.py args]; env NNODES, NODE_RANK, PORT, MASTER_ADDR, PYTHON.
# Without CUDA, tools/train.py switches the backend to gloo, so GPUS is then a process count.
#
# Several nodes (OpenMMLab's form; torchrun's static rendezvous on MASTER_ADDR:PORT, which
# node 0 serves): on each node, with the same CONFIG, GPUS (processes per node) and work dir,
#   NNODES=2 NODE_RANK=0 PORT=29500 MASTER_ADDR=<node 0 address> bash tools/dist_train.sh CONFIG 8
#   NNODES=2 NODE_RANK=1 PORT=29500 MASTER_ADDR=<node 0 address> bash tools/dist_train.sh CONFIG 8

if [ $# -lt 2 ]; then
    echo "usage: [NNODES=1] [NODE_RANK=0] [PORT=29500] [MASTER_ADDR=127.0.0.1] [PYTHON=python] \\" >&2
    echo "       bash $0 CONFIG GPUS [train.py args]" >&2
    echo "error: CONFIG and GPUS (processes per node) are required" >&2
    exit 2
fi

CONFIG=$1
GPUS=$2
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
    "$(dirname "$0")/train.py" \
    "$CONFIG" \
    --launcher pytorch "${@:3}"
