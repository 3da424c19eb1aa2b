#!/usr/bin/env bash
# Run a command in two throw-away Soft-RoCE guests (A and B) with this repository shared in.
#
#   tools/rdma-lab/run.sh [-t SECONDS] [-m MiB] [-M MTU] [-1] COMMAND [ARGS...]
#
# Each guest (Debian bookworm under QEMU, one vCPU, one virtio NIC) has the RDMA device rxe0 on
# its only link; the two links meet over UDP on 127.0.0.1 and nowhere else (no slirp, no default
# route).  COMMAND runs in both guests as root, in the repository root, with:
#   LAB_ROLE   a | b          LAB_IP / LAB_PEER   198.18.0.1 / 198.18.0.2 (swapped in B)
#   LAB_DEVICE rxe0           LAB_OUT             per-guest output folder (on the host: RUN/a, RUN/b)
# and the repository importable as the shimmy package (PYTHONPATH).
#   -t  job timeout inside each guest (default 300 s); QEMU itself is killed 60 s after that
#   -m  MiB of memory per guest (default 1024)     -M  link MTU (default 1500)
#   -1  boot guest A only
# Prints both guests' output; exits 0 only if COMMAND exited 0 in every guest (124: timeout).
# Only the QEMU processes this script started are stopped, by pid, on exit or signal.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
LAB_DIR=${LAB_DIR:-/var/tmp/shimmy-rdma-lab}
IMG=$LAB_DIR/image
TMO=300 MEM=1024 MTU=1500 GUESTS=(a b)
while getopts "t:m:M:1h" opt; do
  case $opt in
    t) TMO=$OPTARG ;; m) MEM=$OPTARG ;; M) MTU=$OPTARG ;; 1) GUESTS=(a) ;;
    *) sed -n '2,/^set -euo/p' "$0" | grep '^#' | cut -c3-; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
(($#)) || { echo "usage: $0 [-t SECONDS] [-m MiB] [-M MTU] [-1] COMMAND [ARGS...]" >&2; exit 2; }
[[ $TMO =~ ^[0-9]+$ && $MEM =~ ^[0-9]+$ && $MTU =~ ^[0-9]+$ ]] \
  || { echo "-t, -m and -M take whole numbers" >&2; exit 2; }
[[ -f $IMG/root.img ]] || { echo "no guest image in $IMG: run $HERE/build-image.sh" >&2; exit 2; }

say() { printf '[rdma-lab %(%H:%M:%S)T] %s\n' -1 "$*"; }
RUN=$LAB_DIR/runs/$(date +%Y%m%d-%H%M%S)-$$
mkdir -p "$RUN/a" "$RUN/b"
{ echo 'set -o pipefail'; printf '%q ' "$@"; echo; } >"$RUN/job.sh"

PIDS=()
stop_guests() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$p" 2>/dev/null || true
  done
  rm -f "$RUN"/*.qcow2
}
trap stop_guests EXIT
trap 'exit 130' INT TERM

udp_port() { python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PA=$(udp_port); PB=$(udp_port)
while [[ $PB == "$PA" ]]; do PB=$(udp_port); done

boot() {  # role ip peer mac netdev
  local role=$1
  qemu-img create -q -f qcow2 -F raw -b "$IMG/root.img" "$RUN/$role.qcow2"
  # TCG: this host's /dev/kvm cannot run the guest kernel (see docs/rdma.md).
  qemu-system-x86_64 -accel tcg,thread=multi -cpu max -machine q35 -smp 1 -m "$MEM" \
    -nodefaults -no-user-config -display none -no-reboot \
    -serial "file:$RUN/console-$role.log" \
    -kernel "$IMG/vmlinuz" -initrd "$IMG/initrd.img" \
    -append "root=/dev/vda rw console=ttyS0 quiet panic=-1 net.ifnames=0 init=/sbin/shimmy-lab-init lab.role=$role lab.ip=$2 lab.peer=$3 lab.timeout=$TMO lab.mtu=$MTU" \
    -drive "file=$RUN/$role.qcow2,if=none,id=d0,format=qcow2,cache=unsafe" \
    -device virtio-blk-pci,drive=d0 \
    -netdev "$5" -device "virtio-net-pci,netdev=n0,mac=$4" \
    -virtfs "local,path=$REPO,mount_tag=repo,security_model=none,id=repo" \
    -virtfs "local,path=$RUN,mount_tag=run,security_model=none,id=run" \
    >"$RUN/qemu-$role.log" 2>&1 &
  PIDS+=($!)
}
if ((${#GUESTS[@]} == 2)); then
  boot a 198.18.0.1 198.18.0.2 52:54:00:5d:00:0a "socket,id=n0,udp=127.0.0.1:$PB,localaddr=127.0.0.1:$PA"
  boot b 198.18.0.2 198.18.0.1 52:54:00:5d:00:0b "socket,id=n0,udp=127.0.0.1:$PA,localaddr=127.0.0.1:$PB"
else
  boot a 198.18.0.1 198.18.0.2 52:54:00:5d:00:0a "hubport,id=n0,hubid=0"
fi
say "guests ${GUESTS[*]} booting (run folder $RUN, job timeout ${TMO}s)"

T0=$SECONDS
deadline=$((SECONDS + TMO + 60))
for p in "${PIDS[@]}"; do
  while kill -0 "$p" 2>/dev/null && ((SECONDS < deadline)); do sleep 1; done
done
((SECONDS < deadline)) || say "guests still running $((TMO + 60))s after boot: stopping them"
stop_guests
PIDS=()
say "guests done after $((SECONDS - T0))s"

status=0
for role in "${GUESTS[@]}"; do
  rc=$(cat "$RUN/$role/rc" 2>/dev/null || echo none)
  echo "======== guest $role: rc=$rc (output $RUN/$role/job.log) ========"
  if [[ -f $RUN/$role/job.log ]]; then cat "$RUN/$role/job.log"; else tail -n 40 "$RUN/console-$role.log"; fi
  [[ $rc == 0 ]] || status=1
done
echo "$RUN" >"$LAB_DIR/runs/latest"
exit $status
