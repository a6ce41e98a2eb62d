#!/usr/bin/env bash
# The same command on every worker of a Cloud TPU VM pod; JAX configures
# jax.distributed itself from the TPU VM metadata (no coordinator flags).
#
#   TPU_NAME=my-pod ZONE=us-central2-b CONFIG=configs/big.py WORKDIR=/mnt/shared/runs/big \
#       launch/tpu_pod.sh
#
# Assumes the repository is checked out at the same path on every worker
# (REPO_DIR, default ~/jaxnmt) with its virtualenv at REPO_DIR/.venv (installed with
# the gcs extra for a gs:// WORKDIR), and that WORKDIR is a path every worker reaches:
# gs://bucket/run, or a shared mount (Filestore/NFS). With gs://, pass
# --config.data.prepared_dir=<a local path holding the same prepared data on every
# worker> (docs/multi-host.md, "Workdir on Cloud Storage"). DRY_RUN=1 prints the gcloud command and the command each worker
# runs, and starts nothing (it needs no gcloud).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME, the TPU VM pod name}"
: "${ZONE:?set ZONE, the pod zone}"
: "${CONFIG:?set CONFIG, e.g. configs/big.py}"
: "${WORKDIR:?set WORKDIR, a shared filesystem path every worker can reach}"
REPO_DIR="${REPO_DIR:-~/jaxnmt}"

# The arguments as shell words, single-quoted where needed (bash 3.2 has no ${x@Q}).
quote() {
  local arg words=() q="'\\''"
  for arg in "$@"; do
    if [[ -n $arg && $arg != *[!A-Za-z0-9_@%+=:,./-]* ]]; then words+=("$arg")
    else words+=("'${arg//\'/$q}'"); fi
  done
  echo "${words[*]}"
}

# A leading ~ stays unquoted: the worker's shell expands it to the worker's home.
case "$REPO_DIR" in
  '~') directory='~' ;;
  '~/'*) directory="~/$(quote "${REPO_DIR#'~/'}")" ;;
  *) directory=$(quote "$REPO_DIR") ;;
esac
remote="cd $directory && . .venv/bin/activate && $(quote python -m jaxnmt.main \
  --config="$CONFIG" --workdir="$WORKDIR" "$@")"
command=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all
         --command="$remote")
if [[ -n ${DRY_RUN:-} && $DRY_RUN != 0 ]]; then
  quote "${command[@]}"
  echo '# each worker runs (JAX reads the TPU VM metadata):'
  echo "$remote"
  exit 0
fi
code=0
"${command[@]}" || code=$?
if [[ $code -eq 134 ]]; then  # SIGABRT on a worker: JAX's runtime ended it (its log says why)
  echo "launch/tpu_pod.sh: a worker was aborted by JAX's distributed runtime: a process" \
       "of the job was lost or never came; rerun the command to resume from the last" \
       "complete checkpoint" >&2
fi
exit "$code"
