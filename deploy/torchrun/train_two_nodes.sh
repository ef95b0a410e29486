#!/usr/bin/env bash
# One training run on two machines with torchrun (no scheduler). Run this on both, with NODE_RANK=0 on the machine
# whose address is MASTER_ADDR and NODE_RANK=1 on the other; both need the data, the project and the same
# MLFLOW_TRACKING_URI. The test suite runs exactly this with both "nodes" on one machine, on CPU with gloo
# (tests/test_scaleout.py::test_two_torchrun_nodes_train_one_run_on_a_new_store).
#
#   NODE_RANK=0 MASTER_ADDR=10.0.0.1 deploy/torchrun/train_two_nodes.sh experiments/hippocampus_unet.yaml
set -euo pipefail
EXPERIMENT="${1:?usage: train_two_nodes.sh EXPERIMENT.yaml}"
: "${NODE_RANK:?set NODE_RANK (0 on the master, 1 on the other node)}" "${MASTER_ADDR:?set MASTER_ADDR}"
DEVICES="${DEVICES:-1}"   # processes (GPUs) per node
torchrun --nnodes 2 --nproc-per-node "$DEVICES" --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" \
    --master-port "${MASTER_PORT:-29500}" "$(which medseg)" train "$EXPERIMENT" \
    --set trainer.num_nodes=2 --set trainer.devices="$DEVICES" --set trainer.strategy=ddp
