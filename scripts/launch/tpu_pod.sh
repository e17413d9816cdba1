#!/bin/bash
# mmfm pretrain on a Cloud TPU VM pod slice (e.g. v5p-32: 4 hosts): one process per host, started on every
# worker at once by `gcloud ... ssh --worker=all`. Each process finds the others by itself (JAX reads the TPU
# metadata; no flags), and uses all chips of its host.
#
#   TPU=my-v5p-32 ZONE=us-east5-a BUCKET=gs://my-bucket bash scripts/launch/tpu_pod.sh configs/tangle_like.yaml
#
# Storage: the run directory is a gs:// URL (every host writes its checkpoint shards there; `pip install gcsfs`
# for the epath backend). The cohort is read with memory-mapped HDF5, so it must be on each host's file system:
# copy it to local SSD once (below), or mount a Filestore share on every worker.
# Pre-emption (spot / maintenance) sends SIGTERM: the hosts agree on a step, checkpoint and exit 75; run this
# script again (or use a queued resource) and --resume auto continues.
set -euo pipefail
CONFIG=${1:?recipe yaml}
TPU=${TPU:?TPU VM name}; ZONE=${ZONE:?zone}; BUCKET=${BUCKET:?gs://bucket}
RUN=${RUN:-$BUCKET/runs/$(basename "$CONFIG" .yaml)}
COHORT_URL=${COHORT_URL:-$BUCKET/cohorts/tcga}
ssh_all() { gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "$1"; }

# once per pod: this checkout, its dependencies and the cohort on every host
gcloud compute tpus tpu-vm scp --recurse --worker=all --zone "$ZONE" "$(git rev-parse --show-toplevel)" "$TPU":mmfm
ssh_all "cd mmfm && python3 -m venv .venv && .venv/bin/pip install -q -e . 'jax[tpu]' gcsfs &&
         mkdir -p /mnt/disks/cohort && gcloud storage rsync -r $COHORT_URL /mnt/disks/cohort"

# every (re)start: the same command on all hosts
ssh_all "cd mmfm && .venv/bin/mmfm pretrain --config $CONFIG --out $RUN --set data.cohort=/mnt/disks/cohort \
         --resume auto ${EXTRA:-}"
