#!/usr/bin/env bash
# Build (or reuse) the guest image of the Soft-RoCE lab: a Debian bookworm root filesystem with
# rdma-core, pyverbs, perftest and the Python packages shimmy needs, plus the kernel and initrd.
#
#   tools/rdma-lab/build-image.sh [--force]
#
# Everything is cached under $LAB_DIR (default /var/tmp/shimmy-rdma-lab):
#   rootfs/        debootstrap'ed tree (redone only when the package list changes)
#   image/         root.img (raw ext4), vmlinuz, initrd.img, key (redone when init.sh changes)
# Needs root (debootstrap, chroot) and the Debian archive this host's apt already uses.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
LAB_DIR=${LAB_DIR:-/var/tmp/shimmy-rdma-lab}
SUITE=bookworm
ROOT=$LAB_DIR/rootfs
IMG=$LAB_DIR/image
FORCE=0
[[ ${1:-} == --force ]] && FORCE=1

# Guest packages. posix_ipc is not packaged in bookworm: its wheel comes from PyPI via the host.
PKGS=(linux-image-amd64 initramfs-tools kmod iproute2 procps util-linux
      rdma-core ibverbs-providers ibverbs-utils perftest
      python3 python3-pyverbs python3-zmq python3-msgpack python3-pytest python3-pip
      python3-click python3-rich)  # the CLI that starts the daemons
WHEELS=(posix_ipc==1.3.2)

say() { printf '[rdma-lab build %(%H:%M:%S)T] %s\n' -1 "$*"; }
[[ $(id -u) == 0 ]] || { echo "build-image.sh must run as root (debootstrap, chroot)" >&2; exit 1; }

need=()
for pair in debootstrap:debootstrap mkfs.ext4:e2fsprogs qemu-system-x86_64:qemu-system-x86 \
            qemu-img:qemu-utils; do
  command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
if ((${#need[@]})); then
  say "installing host packages: ${need[*]}"
  timeout 600 apt-get update -qq
  DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

mirror() {  # the first non-security Debian archive of this host's apt sources
  { grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' || true
    grep -hsE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list | awk '{print $2}' || true
  } | grep -v security | head -n1 || true
}
MIRROR=${MIRROR:-$(mirror)}
[[ -n $MIRROR ]] || { echo "no Debian archive in this host's apt sources; set MIRROR" >&2; exit 1; }

pkg_key=$(echo "$SUITE $MIRROR ${PKGS[*]} ${WHEELS[*]}" | sha256sum | cut -c1-16)
img_key=$(cat "$HERE/init.sh" "$0" <(echo "$pkg_key") | sha256sum | cut -c1-16)
if ((!FORCE)) && [[ -f $IMG/root.img && $(cat "$IMG/key" 2>/dev/null) == "$img_key" ]]; then
  say "image up to date ($IMG)"
  exit 0
fi
mkdir -p "$LAB_DIR" "$IMG"

unmount() { for m in proc sys; do mountpoint -q "$ROOT/$m" && umount -l "$ROOT/$m"; done; return 0; }
trap unmount EXIT

if ((FORCE)) || [[ $(cat "$ROOT/.pkg-key" 2>/dev/null) != "$pkg_key" ]]; then
  unmount
  rm -rf --one-file-system "$ROOT"
  say "debootstrap $SUITE from $MIRROR"
  timeout 1200 debootstrap --variant=minbase "$SUITE" "$ROOT" "$MIRROR" >"$LAB_DIR/debootstrap.log" 2>&1 \
    || { tail -n 20 "$LAB_DIR/debootstrap.log"; exit 1; }
  mount -t proc proc "$ROOT/proc"
  mount -t sysfs sys "$ROOT/sys"
  printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"   # no services start in the chroot
  chmod 0755 "$ROOT/usr/sbin/policy-rc.d"
  mkdir -p "$ROOT/etc/initramfs-tools"
  printf 'virtio_pci\nvirtio_blk\next4\n' >>"$ROOT/etc/initramfs-tools/modules"
  in_root() { chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
              DEBIAN_FRONTEND=noninteractive "$@"; }
  say "apt-get install in the guest tree (${#PKGS[@]} packages)"
  in_root timeout 600 apt-get update -qq
  in_root timeout 1800 apt-get install -y -qq --no-install-recommends "${PKGS[@]}" \
    >"$LAB_DIR/apt.log" 2>&1 || { tail -n 30 "$LAB_DIR/apt.log"; exit 1; }
  pyv=$(in_root python3 -c 'import sys; print("%d%d" % sys.version_info[:2])')
  say "wheels for cp$pyv: ${WHEELS[*]}"
  rm -rf "$LAB_DIR/wheels" "$ROOT/tmp/wheels"
  timeout 600 python3 -m pip download -q --only-binary=:all: --implementation cp \
    --python-version "$pyv" --abi "cp$pyv" --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 -d "$LAB_DIR/wheels" "${WHEELS[@]}"
  cp -r "$LAB_DIR/wheels" "$ROOT/tmp/wheels"
  in_root timeout 600 python3 -m pip install -q --break-system-packages --no-index \
    --no-cache-dir --find-links /tmp/wheels "${WHEELS[@]}"
  rm -rf "$ROOT/tmp/wheels" "$ROOT/usr/sbin/policy-rc.d" "$ROOT"/var/lib/apt/lists/*
  in_root apt-get clean
  unmount
  echo "$pkg_key" >"$ROOT/.pkg-key"
fi

install -m 0755 "$HERE/init.sh" "$ROOT/sbin/shimmy-lab-init"
echo shimmy-lab >"$ROOT/etc/hostname"
: >"$ROOT/etc/resolv.conf"        # the guests have no DNS and no route off their link
mkdir -p "$ROOT/mnt/repo" "$ROOT/mnt/run"
chroot "$ROOT" python3 -c 'import zmq, msgpack, posix_ipc, pytest, pyverbs.device'
kver=$(ls "$ROOT/lib/modules" | sort -V | tail -n1)
[[ -f $ROOT/lib/modules/$kver/kernel/drivers/infiniband/sw/rxe/rdma_rxe.ko ]] \
  || { echo "guest kernel $kver has no rdma_rxe module" >&2; exit 1; }
cp -L "$ROOT/boot/vmlinuz-$kver" "$IMG/vmlinuz"
cp -L "$ROOT/boot/initrd.img-$kver" "$IMG/initrd.img"
say "mkfs.ext4 -> $IMG/root.img"
mkfs.ext4 -q -F -L shimmylab -E root_owner=0:0 -d "$ROOT" "$IMG/root.img.new" 3G
mv "$IMG/root.img.new" "$IMG/root.img"
echo "$img_key" >"$IMG/key"
say "image ready (guest kernel $kver)"
