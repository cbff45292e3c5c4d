#!/usr/bin/env bash
# tools/slurm_test.sh PARTITION JOB_NAME CONFIG CHECKPOINT [test.py args] (OpenMMLab's form)
# env: GPUS (tasks in all, 8), GPUS_PER_NODE (tasks per node, 8), CPUS_PER_TASK (5),
#      SRUN_ARGS (more srun options), GRES (default gpu:GPUS_PER_NODE; GRES= leaves --gres out,
#      for CPU partitions), PYTHON (interpreter, python), MASTER_PORT (rendezvous port).
# As tools/slurm_train.sh, with tools/test.py.

if [ $# -lt 4 ]; then
    echo "usage: [GPUS=8] [GPUS_PER_NODE=8] [CPUS_PER_TASK=5] [SRUN_ARGS=...] [GRES=gpu:N] [PYTHON=python] \\" >&2
    echo "       bash $0 PARTITION JOB_NAME CONFIG CHECKPOINT [test.py args]" >&2
    echo "error: PARTITION, JOB_NAME, CONFIG and CHECKPOINT are required" >&2
    exit 2
fi

PARTITION=$1
JOB_NAME=$2
CONFIG=$3
CHECKPOINT=$4
GPUS=${GPUS:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CPUS_PER_TASK=${CPUS_PER_TASK:-5}
SRUN_ARGS=${SRUN_ARGS:-""}
GRES=${GRES-gpu:${GPUS_PER_NODE}}
PYTHON=${PYTHON:-python}

set -x
PYTHONPATH="$(dirname "$0")/..":$PYTHONPATH \
srun -p ${PARTITION} \
    --job-name=${JOB_NAME} \
    ${GRES:+--gres=${GRES}} \
    --ntasks=${GPUS} \
    --ntasks-per-node=${GPUS_PER_NODE} \
    --cpus-per-task=${CPUS_PER_TASK} \
    --kill-on-bad-exit=1 \
    ${SRUN_ARGS} \
    "$PYTHON" -u "$(dirname "$0")/test.py" "$CONFIG" "$CHECKPOINT" --launcher="slurm" "${@:5}"
