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
set -euo pipefail
: "${NUM_PROCESSES:?set NUM_PROCESSES, the number of processes to start (e.g. 2)}"
: "${DEVICES_PER_PROCESS:?set DEVICES_PER_PROCESS, CPU devices per process (e.g. 4)}"
PYTHON="${PYTHON:-python}"
PORT="${COORDINATOR_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
cd "$(dirname "$0")/.."

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; }
trap cleanup INT TERM

for ((i = 0; i < NUM_PROCESSES; i++)); do
  command=(env JAX_PLATFORMS=cpu
           "XLA_FLAGS=--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS} ${XLA_FLAGS:-}"
           "$PYTHON" -m "${JAXNMT_MAIN:-jaxnmt.main}"
           --coordinator_address="127.0.0.1:${PORT}" --num_processes="${NUM_PROCESSES}"
           --process_id="$i" "$@")
  if [[ -n "${LOG_DIR:-}" && $i -gt 0 ]]; then
    mkdir -p "$LOG_DIR"
    "${command[@]}" > "$LOG_DIR/process_$i.log" 2>&1 &
  else
    "${command[@]}" &
  fi
  pids+=($!)
done

status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit "$status"
