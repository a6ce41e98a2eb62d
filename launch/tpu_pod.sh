#!/usr/bin/env bash
# The same command on every worker of a Cloud TPU VM pod; jax.distributed finds the
# other workers from the TPU metadata.
#
#   TPU_NAME=my-pod ZONE=us-central2-b CONFIG=configs/big.py WORKDIR=/mnt/shared/runs/big \
#       launch/tpu_pod.sh
#
# Assumes the repository is checked out at the same path on every worker
# (REPO_DIR, default ~/jaxnmt) with its virtualenv at REPO_DIR/.venv, and that WORKDIR
# is a POSIX path every worker shares (e.g. a Filestore/NFS mount; gs:// is not
# supported yet).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME, the TPU VM pod name}"
: "${ZONE:?set ZONE, the pod zone}"
: "${CONFIG:?set CONFIG, e.g. configs/big.py}"
: "${WORKDIR:?set WORKDIR, a shared filesystem path every worker can reach}"
REPO_DIR="${REPO_DIR:-~/jaxnmt}"
extra=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  cd $REPO_DIR && . .venv/bin/activate &&
  python -m jaxnmt.main --config=$CONFIG --workdir=$WORKDIR $extra"
