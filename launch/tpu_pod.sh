#!/usr/bin/env bash
# Runs one dsa-jax training config on EVERY worker of a TPU pod slice, with the same command (multi-host SPMD).
#
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.x=y ...]
#   PROJECT=my-proj SYNC=1 SETUP=1 launch/tpu_pod.sh my-v5p-64 us-east5-a configs/wan_1_3b.py gs://bucket/dsa \
#       --config.data.prompts.path=/data/prompts.txt --config.train.teacher_from=/data/wan14b
#
# On each worker jax.distributed.initialize() discovers the slice by itself (dsa_jax calls it when
# TPU_WORKER_HOSTNAMES lists several hosts); every worker loads its own shard of each batch (grain, by
# jax.process_index()), and all workers write the orbax checkpoint together, so WORKDIR must be shared storage
# (a gs:// bucket; then export the model afterwards with
#   python -m dsa_jax.training.checkpointing export gs://bucket/dsa ./model
# on any machine). Re-running the same command resumes from the latest complete checkpoint (preemption-safe:
# SIGTERM makes every worker save and stop).
#
# Mesh: config.mesh.shape (data=-1, fsdp=1, tensor=1 by default). For Wan-1.3B DSA on a v5p slice, FSDP over the
# chips of a host and data parallelism across hosts is a good start, e.g. on v5p-64 (32 chips, 8 hosts):
#   --config.mesh.shape.data=8 --config.mesh.shape.fsdp=4 --config.mesh.shape.tensor=1 --config.train.batch_size=32
# (batch 1 per chip, as Self Forcing; train.batch_size must divide by data x fsdp). A 14B teacher needs FSDP >= 4
# (frozen, bf16: 28 GB).
#
# Environment: PROJECT (gcloud project), REPO (checkout path on the workers, default ~/dsa_jax), PYTHON (default
# python3), SYNC=1 copies this checkout to the workers first, SETUP=1 pip-installs it with the TPU extra,
# LOG (per-worker log file on the workers, default ~/dsa_jax_train.log), DETACH=1 runs under nohup and returns.
set -euo pipefail
if [ $# -lt 4 ]; then
  sed -n '2,8p' "$0"; exit 2
fi
TPU=$1; ZONE=$2; CONFIG=$3; WORKDIR=$4; shift 4
REPO=${REPO:-'~/dsa_jax'}
PYTHON=${PYTHON:-python3}
LOG=${LOG:-'~/dsa_jax_train.log'}
GCLOUD=(gcloud compute tpus tpu-vm)
PROJ=()
[ -n "${PROJECT:-}" ] && PROJ=(--project "$PROJECT")
HERE=$(cd "$(dirname "$0")/.." && pwd)

if [ "${SYNC:-0}" = 1 ]; then
  tar -C "$HERE" --exclude=.git --exclude='.venv' --exclude='out' --exclude='runs' -czf /tmp/dsa_jax_src.tgz .
  "${GCLOUD[@]}" scp /tmp/dsa_jax_src.tgz "$TPU":/tmp/dsa_jax_src.tgz --zone "$ZONE" "${PROJ[@]}" --worker=all
  "${GCLOUD[@]}" ssh "$TPU" --zone "$ZONE" "${PROJ[@]}" --worker=all \
    --command "mkdir -p $REPO && tar -C $REPO -xzf /tmp/dsa_jax_src.tgz"
fi
if [ "${SETUP:-0}" = 1 ]; then
  "${GCLOUD[@]}" ssh "$TPU" --zone "$ZONE" "${PROJ[@]}" --worker=all \
    --command "cd $REPO && $PYTHON -m pip install -q -e '.[tpu]'"
fi

ARGS=$(printf ' %q' "$@")
RUN="cd $REPO && $PYTHON -m dsa_jax train --config $CONFIG --workdir $WORKDIR$ARGS"
if [ "${DETACH:-0}" = 1 ]; then
  RUN="nohup bash -c '$RUN' > $LOG 2>&1 &"
fi
echo "on every worker of $TPU: $RUN"
exec "${GCLOUD[@]}" ssh "$TPU" --zone "$ZONE" "${PROJ[@]}" --worker=all --command "$RUN"
