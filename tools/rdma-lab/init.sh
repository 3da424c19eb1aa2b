#!/bin/bash
# PID 1 of a lab guest (kernel argument init=/sbin/shimmy-lab-init; no systemd, no udev).
# Brings up the one virtio NIC on the lab-only /24 (no default route), creates the Soft-RoCE
# device rxe0 on it, mounts the repository and the run folder (9p), makes the repository
# importable with the installed package layout (shimmy, shimmy.daemon, shimmy.sdk), runs
# /mnt/run/job.sh under `timeout`, stores its exit status in /mnt/run/<role>/rc, powers off.
# Kernel arguments: lab.role=a|b lab.ip=IP lab.peer=IP lab.timeout=SECONDS lab.mtu=MTU
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1

off() { sync; umount /mnt/run /mnt/repo 2>/dev/null; echo o >/proc/sysrq-trigger; sleep 60; }
trap off EXIT

mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sys /sys
mountpoint -q /dev || mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm /dev/mqueue
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 shm /dev/shm        # posix_ipc shared memory and semaphores
mount -t mqueue mqueue /dev/mqueue
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mount -o remount,rw /

role=a ip=198.18.0.1 peer=198.18.0.2 tmo=300 mtu=1500
for arg in $(</proc/cmdline); do
  case $arg in
    lab.role=*) role=${arg#*=} ;; lab.ip=*) ip=${arg#*=} ;; lab.peer=*) peer=${arg#*=} ;;
    lab.timeout=*) tmo=${arg#*=} ;; lab.mtu=*) mtu=${arg#*=} ;;
  esac
done
hostname "lab-$role"
for m in virtio_net 9pnet_virtio 9p ib_uverbs rdma_ucm rdma_rxe; do modprobe "$m"; done
ip link set lo up
ip link set eth0 mtu "$mtu" up
ip addr add "$ip/24" dev eth0
rdma link add rxe0 type rxe netdev eth0

mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288 run /mnt/run
mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288,cache=none repo /mnt/repo
ulimit -l unlimited

# The package maps sdk/ and daemon/ into shimmy.sdk and shimmy.daemon (pyproject.toml), as an
# editable install does on the host: a path hook at interpreter start-up resolves those two names
# to the repository folders, so the guest runs the repository's code exactly as it is.
site=$(python3 -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
mkdir -p "$site"
cat >"$site/shimmy_lab_paths.py" <<'PY'
import importlib.abc
import importlib.util
import sys


class _RepoLayout(importlib.abc.MetaPathFinder):
    roots = {"shimmy.sdk": "/mnt/repo/sdk", "shimmy.daemon": "/mnt/repo/daemon"}

    def find_spec(self, name, path=None, target=None):
        root = self.roots.get(name)
        if root is None:
            return None
        return importlib.util.spec_from_file_location(name, root + "/__init__.py",
                                                      submodule_search_locations=[root])


sys.meta_path.insert(0, _RepoLayout())
PY
echo "import shimmy_lab_paths" >"$site/shimmy_lab_paths.pth"
export PYTHONPATH=/mnt/repo

out=/mnt/run/$role
mkdir -p "$out"
export LAB_ROLE=$role LAB_IP=$ip LAB_PEER=$peer LAB_OUT=$out LAB_DEVICE=rxe0
cd /mnt/repo
echo "[lab-init] $role: ip=$ip peer=$peer kernel=$(uname -r) up=$(cut -d' ' -f1 /proc/uptime)s"
timeout -k 5 "$tmo" bash /mnt/run/job.sh </dev/null >"$out/job.log" 2>&1
echo $? >"$out/rc"
echo "[lab-init] $role: job rc=$(cat "$out/rc") up=$(cut -d' ' -f1 /proc/uptime)s"
