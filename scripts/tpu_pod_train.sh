#!/usr/bin/env bash
# Training on a Cloud TPU pod slice (TPU VM): the same atr_jax.main command on every worker, joined by
# jax.distributed (--distributed=on: JAX reads the workers and this worker's index from the TPU metadata).
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b CONFIG=configs/clotho_infonce.py WORKDIR=/mnt/shared/runs/infonce \
#     bash scripts/tpu_pod_train.sh [--config.key=value ...]
#
# Environment variables:
#   TPU_NAME, ZONE  the TPU VM slice and its zone (required); PROJECT: the GCP project (default: gcloud's)
#   CONFIG          experiment config file (default configs/clotho_infonce.py)
#   WORKDIR         run folder; must be a filesystem every worker mounts at the same path (e.g. Filestore/NFS):
#                   every worker writes its part of the checkpoints, and the run resumes from them
#   REPO_DIR        the atr-jax checkout on every worker (default atr-jax, in the home folder), with atr-jax, its requirements and
#                   jax[tpu] installed for PYTHON (default python3)
# config.data.raw_dir and config.data.data_dir must be on the shared filesystem too (worker 0 prepares the
# TFRecords on first use while the others wait). Running the same command again resumes from the latest checkpoint.
set -euo pipefail

TPU_NAME=${TPU_NAME:?set TPU_NAME to the TPU VM slice}
ZONE=${ZONE:?set ZONE to the slice zone}
CONFIG=${CONFIG:-configs/clotho_infonce.py}
WORKDIR=${WORKDIR:?set WORKDIR to a run folder on a filesystem mounted by every worker}
REPO_DIR=${REPO_DIR:-atr-jax}
PYTHON=${PYTHON:-python3}

# Quoted once for the remote shell; the extra arguments (config overrides) pass through unchanged.
remote="cd $REPO_DIR && TF_CPP_MIN_LOG_LEVEL=2 $PYTHON -m atr_jax.main --distributed=on"
remote+=" --config $(printf '%q' "$CONFIG") --workdir $(printf '%q' "$WORKDIR")"
if (($#)); then
  remote+=" $(printf '%q ' "$@")"
fi

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} --worker=all \
  --command="$remote"
