#!/bin/bash
# mmfm pretrain on GKE with xpk: a JobSet of one pod per host (TPU hosts, or GPU nodes with all their GPUs), each
# pod running one mmfm process. TPU pods find each other from the JobSet's TPU variables; GPU pods from the
# JAX_COORDINATOR_ADDRESS / NNODES / NODE_RANK that xpk sets — `mmfm pretrain` reads both, no flags.
#
#   CLUSTER=my-xpk IMAGE=us-docker.pkg.dev/PROJECT/mmfm/mmfm:latest BUCKET=gs://my-bucket \
#     bash scripts/launch/gke_xpk.sh configs/tangle_like.yaml            # TPU (DEVICE=--tpu-type=v5p-32)
#   DEVICE="--device-type=h100-80gb-8 --num-nodes=4" ... bash scripts/launch/gke_xpk.sh ...   # GPU nodes
#
# The image holds mmfm with `jax[tpu]` or `jax[cuda12]` and gcsfs. The run directory is gs://; the cohort must be
# a file system in the pod: a Filestore (NFS) volume mounted at /data (xpk storage attach) or copied to local SSD.
# Pre-emption / eviction sends SIGTERM and waits --termination-grace-period-seconds: long enough for one step
# and a checkpoint. The pods exit 75 after the checkpoint; --restart-on-user-code-failure with --max-restarts
# lets JobSet restart them, and --resume auto continues from that checkpoint.
set -euo pipefail
CONFIG=${1:?recipe yaml}
CLUSTER=${CLUSTER:?xpk cluster}; IMAGE=${IMAGE:?docker image with mmfm}; BUCKET=${BUCKET:?gs://bucket}
DEVICE=${DEVICE:---tpu-type=v5p-32}
RUN=${RUN:-$BUCKET/runs/$(basename "$CONFIG" .yaml)}
NAME=${NAME:-mmfm-$(basename "$CONFIG" .yaml | tr '_' '-')}

xpk workload create --cluster "$CLUSTER" --workload "$NAME" --docker-image "$IMAGE" $DEVICE \
    --max-restarts 20 --restart-on-user-code-failure --termination-grace-period-seconds 300 \
    --command "mmfm pretrain --config $CONFIG --out $RUN --set data.cohort=/data/cohort --resume auto ${EXTRA:-}"
