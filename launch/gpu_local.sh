#!/usr/bin/env bash
# Runs one dsa-jax training config on a local multi-GPU box (or several boxes).
#
#   launch/gpu_local.sh CONFIG WORKDIR [--config.x=y ...]
#   PROCS=8 launch/gpu_local.sh configs/wan_1_3b.py runs/dsa --config.data.prompts.path=prompts.txt
#
# PROCS=1 (default): one process drives every visible GPU (jax sees them all; the mesh spans them).
# PROCS=N: one process per GPU (CUDA_VISIBLE_DEVICES=i), joined by jax.distributed through a coordinator on
#   localhost:PORT, like a multi-host job; each process loads its own shard of every batch.
# Several boxes: run this script on each with NODES=M NODE_RANK=r MASTER=host0:port and PROCS=GPUs per box; the
#   WORKDIR must be on storage that every box sees.
# Re-running the same command resumes from the latest complete checkpoint; Ctrl-C / SIGTERM saves and stops.
# Leave the NCCL environment as the machine sets it (e.g. NCCL_NVLS_ENABLE).
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,5p' "$0"; exit 2
fi
CONFIG=$1; WORKDIR=$2; shift 2
PYTHON=${PYTHON:-python3}
PROCS=${PROCS:-1}
NODES=${NODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-12355}
MASTER=${MASTER:-localhost:$PORT}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}

if [ "$PROCS" = 1 ] && [ "$NODES" = 1 ]; then
  exec "$PYTHON" -m dsa_jax train --config "$CONFIG" --workdir "$WORKDIR" "$@"
fi

mkdir -p "$WORKDIR"
TOTAL=$((PROCS * NODES))
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; }
trap cleanup INT TERM
for ((i = 0; i < PROCS; i++)); do
  rank=$((NODE_RANK * PROCS + i))
  CUDA_VISIBLE_DEVICES=$i DSA_JAX_COORDINATOR=$MASTER DSA_JAX_NUM_PROCESSES=$TOTAL DSA_JAX_PROCESS_ID=$rank \
    "$PYTHON" -m dsa_jax train --config "$CONFIG" --workdir "$WORKDIR" "$@" \
    > "$WORKDIR/train.$rank.log" 2>&1 &
  pids+=($!)
done
echo "started ${#pids[@]} processes (ranks $((NODE_RANK * PROCS))..$((NODE_RANK * PROCS + PROCS - 1)) of $TOTAL); logs: $WORKDIR/train.<rank>.log"
[ "$NODE_RANK" = 0 ] && tail -f "$WORKDIR/train.0.log" --pid "${pids[0]}" &
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit $status
