#!/usr/bin/env bash
# Runs one NTK-CL config on every worker of a Cloud TPU pod slice (all workers, same command).
#
#   experiments/launch_tpu_pod.sh <tpu-name> <zone> <config-with-args> <workdir>
#   e.g. experiments/launch_tpu_pod.sh my-v4-32 us-central2-b \
#          "experiments/configs/cifar100.py:backbone=in21k,weights_dir=/mnt/weights" /mnt/runs/cifar_s0
#
# Each worker calls jax.distributed.initialize() (--multihost), reads its own shard of every
# global batch, and only process 0 writes metrics/summary. The workdir must be on a filesystem all
# workers share (NFS / a GCS FUSE mount), so that a rerun of this same command resumes.
set -euo pipefail
TPU=$1 ZONE=$2 CONFIG=$3 WORKDIR=$4
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  cd ~/ntkcl-jax && python -m ntkcl_jax.main --config '$CONFIG' --workdir '$WORKDIR' --multihost"
