#!/usr/bin/env bash
# Multi-host on one machine: NUM_PROCESSES jaxnmt processes on 127.0.0.1, each with
# DEVICES_PER_PROCESS CPU devices, joined by jax.distributed (gloo collectives).
#
#   NUM_PROCESSES=2 DEVICES_PER_PROCESS=4 launch/local.sh \
#       --config=configs/tiny.py --workdir=runs/tiny-mp
#
# Optional: COORDINATOR_PORT (default: a free port), LOG_DIR (per-process logs there
# instead of the terminal; process 0 always prints to the terminal), PYTHON, and
# JAXNMT_MAIN (the module to run, default jaxnmt.main; tests run their own drivers).
# DRY_RUN=1 prints each process's command, one line per process (run from the
# repository root), and starts nothing.
set -euo pipefail
: "${NUM_PROCESSES:?set NUM_PROCESSES, the number of processes to start (e.g. 2)}"
: "${DEVICES_PER_PROCESS:?set DEVICES_PER_PROCESS, CPU devices per process (e.g. 4)}"
PYTHON="${PYTHON:-python}"
PORT="${COORDINATOR_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
cd "$(dirname "$0")/.."

# The arguments as shell words, single-quoted where needed: a dry run's lines can be
# pasted as they are (bash 3.2, macOS's, has no ${x@Q}).
quote() {
  local arg words=() q="'\\''"
  for arg in "$@"; do
    if [[ -n $arg && $arg != *[!A-Za-z0-9_@%+=:,./-]* ]]; then words+=("$arg")
    else words+=("'${arg//\'/$q}'"); fi
  done
  echo "${words[*]}"
}
dry_run() { [[ -n ${DRY_RUN:-} && $DRY_RUN != 0 ]]; }

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; }
trap cleanup INT TERM

for ((i = 0; i < NUM_PROCESSES; i++)); do
  command=(env JAX_PLATFORMS=cpu
           "XLA_FLAGS=--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS}${XLA_FLAGS:+ $XLA_FLAGS}"
           "$PYTHON" -m "${JAXNMT_MAIN:-jaxnmt.main}"
           --coordinator_address="127.0.0.1:${PORT}" --num_processes="${NUM_PROCESSES}"
           --process_id="$i" "$@")
  log=
  if [[ -n "${LOG_DIR:-}" && $i -gt 0 ]]; then log="$LOG_DIR/process_$i.log"; fi
  if dry_run; then
    echo "$(quote "${command[@]}")${log:+ > $(quote "$log") 2>&1}"
    continue
  fi
  if [[ -n $log ]]; then
    mkdir -p "$LOG_DIR"
    "${command[@]}" > "$log" 2>&1 &
  else
    "${command[@]}" &
  fi
  pids+=($!)
done
if dry_run; then exit 0; fi

status=0
for ((i = 0; i < NUM_PROCESSES; i++)); do
  code=0
  wait "${pids[$i]}" || code=$?
  echo "launch/local.sh: process $i exited with code $code" >&2
  if [[ $code -eq 134 ]]; then  # SIGABRT: JAX's runtime ended it from C++ (its log says why)
    echo "launch/local.sh: process $i was aborted by JAX's distributed runtime: a" \
         "process of the job was lost or never came; rerun the command to resume from" \
         "the last complete checkpoint" >&2
  fi
  if [[ $code -ne 0 ]]; then status=$code; fi
done
exit "$status"
