#!/usr/bin/env bash
# Run a lightning_tina config with torchrun: one process per accelerator, on one node or several.
#
#   scripts/torchrun.sh CONFIG [CLI overrides...]
#
# Single node, every visible GPU:       scripts/torchrun.sh configs/tina/open_rs3.yaml
# Two nodes x 8 GPUs (run on each node, same MASTER_ADDR, NODE_RANK 0 and 1):
#   NNODES=2 NODE_RANK=0 GPUS_PER_NODE=8 MASTER_ADDR=node0 scripts/torchrun.sh configs/tina/open_rs3.yaml
# CPU smoke test (2 processes, gloo):
#   GPUS_PER_NODE=2 scripts/torchrun.sh configs/tiny.yaml --trainer.accelerator cpu --trainer.max_steps 1
#
# Environment: NNODES (1), NODE_RANK (0), GPUS_PER_NODE (visible CUDA devices, else 1), MASTER_ADDR (localhost),
# MASTER_PORT (29500), RDZV_ID (tina), PYTHON (python). Lightning reads the ranks torchrun sets, and the script
# passes --trainer.num_nodes/--trainer.devices so that they match the launch. model.grpo.batch_size is per device:
# the global batch grows with the number of processes (docs/distributed.md).
set -euo pipefail

if [[ $# -lt 1 ]]; then
    sed -n '2,16p' "$0" >&2
    exit 2
fi
CONFIG=$1
shift

PYTHON=${PYTHON:-python}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-$("$PYTHON" -c "import torch; print(max(1, torch.cuda.device_count()))")}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}

if [[ "$NNODES" == 1 ]]; then
    rdzv=(--standalone)  # a free local port, nothing to coordinate
else
    rdzv=(--rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "${RDZV_ID:-tina}"
          --node_rank "$NODE_RANK")
fi

exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "$GPUS_PER_NODE" "${rdzv[@]}" \
    -m lightning_tina fit --config "$CONFIG" \
    --trainer.num_nodes "$NNODES" --trainer.devices "$GPUS_PER_NODE" "$@"
