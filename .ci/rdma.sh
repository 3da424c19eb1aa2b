#!/bin/bash
# RDMA tests in the Soft-RoCE lab: builds (or reuses) the guest image, then runs tests/rdma/ in two
# QEMU guests linked over 127.0.0.1 (tools/rdma-lab/).  Exit status = the tests' result.
# Bounded: image build (cached after the first run) and a 480 s job; about 2 min when cached.
#
# One rerun, for one cause only: a guest kernel reporting its emulated NIC's transmit queue stuck
# ("NETDEV WATCHDOG" on its console).  That is the emulated network between the two QEMU
# processes stalling (seen once in about ten runs on a loaded 2-core host; every RDMA write then
# goes unacknowledged), not a result of the tests.  Any other failure fails at once.
set -euo pipefail
cd "$(dirname "$0")/.."
LAB_DIR=${LAB_DIR:-/var/tmp/shimmy-rdma-lab}
timeout 1500 tools/rdma-lab/build-image.sh
stamp=$(mktemp)
trap 'rm -f "$stamp"' EXIT
for attempt in 1 2; do
  touch "$stamp"
  rc=0
  timeout 600 tools/rdma-lab/run.sh -t 480 bash tests/rdma/lab_job.sh || rc=$?
  [ "$rc" = 0 ] && exit 0
  run=""   # this attempt's run folder (run.sh names it in runs/latest when it finishes)
  if [ "$LAB_DIR/runs/latest" -nt "$stamp" ]; then run=$(cat "$LAB_DIR/runs/latest"); fi
  if [ "$attempt" = 1 ] && [ -n "$run" ] && grep -qs "NETDEV WATCHDOG" "$run"/console-*.log; then
    echo "rdma: a guest's emulated NIC stalled (NETDEV WATCHDOG in $run/console-*.log):" \
         "the lab's network, not the tests; running the job once more"
    continue
  fi
  exit "$rc"
done
