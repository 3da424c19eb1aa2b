#!/bin/bash
# Real-container tests of Shimmy: the same steps a user runs (deploy/scripts/lib.sh: engine from
# Debian packages, Python base image from the host's own files, images built offline from wheels,
# Compose v2), then `pytest tests/containers -m container`, whose compose test runs
# deploy/compose/up.sh and down.sh exactly as docs/containers.md shows them.
#
#   bash .ci/containers.sh                 # everything, from a fresh Debian 12 machine (as root)
#   bash .ci/containers.sh -k compose      # extra arguments go to pytest
#   SHIMMY_CI_CLEAN_IMAGES=1 bash .ci/containers.sh   # also remove the images at the end
#   SHIMMY_CI_BUILD_ONLY=1 bash .ci/containers.sh     # engine, images and compose only
#
# Idempotent: an engine that answers is used as it is; the base image is rebuilt only when the
# host's python packages change, the wheels only when the source changes, the images only when
# their context changes.  Every step is bounded with `timeout`.  Everything it creates carries the
# label shimmy.ci=1 or the name prefix shimmy-ci; at exit it removes the containers and compose
# projects it made, and stops dockerd only if this run started it (by pid).  Networking: a dockerd
# started here runs with --bridge=none --iptables=false and every container uses --network host
# or none.  Scratch space: $SHIMMY_WORK (default /tmp/shimmy-ci), kept between runs as a cache.
set -euo pipefail

export SHIMMY_WORK="${SHIMMY_CI_WORK:-${SHIMMY_WORK:-/tmp/shimmy-ci}}"
export SHIMMY_IMAGE_LABEL="shimmy.ci=1"
export SHIMMY_BASE_IMAGE="${SHIMMY_CI_BASE_IMAGE:-shimmy-ci-base:py3}"
export SHIMMY_DAEMON_IMAGE="shimmy-ci-daemon:test" SHIMMY_APP_IMAGE="shimmy-ci-app:test"
export SHIMMY_C_IMAGE="shimmy-ci-c:test"   # examples/c (deploy/docker/Dockerfile.c)
# shellcheck source=../deploy/scripts/lib.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/deploy/scripts/lib.sh"
REPO="$SHIMMY_REPO"

ENGINE_WAS_UP=0
$DOCKER info >/dev/null 2>&1 && ENGINE_WAS_UP=1
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
    $DOCKER ps -aq --filter "label=$SHIMMY_IMAGE_LABEL" | xargs -r $DOCKER rm -f >/dev/null 2>&1
    if [ "${SHIMMY_CI_CLEAN_IMAGES:-0}" = 1 ]; then
      $DOCKER rmi -f "$SHIMMY_APP_IMAGE" "$SHIMMY_DAEMON_IMAGE" "$SHIMMY_C_IMAGE" "$SHIMMY_BASE_IMAGE" >/dev/null 2>&1
      $DOCKER images -q --filter "label=$SHIMMY_IMAGE_LABEL" | sort -u | xargs -r $DOCKER rmi -f >/dev/null 2>&1
    fi
  fi
  if [ $ENGINE_WAS_UP = 0 ] && [ "${SHIMMY_CI_KEEP_DOCKERD:-0}" != 1 ]; then
    engine_stop
  fi
  log "left in place: $SHIMMY_WORK (wheels, build context, Compose v2 venv; a cache)"
  exit $rc
}
trap cleanup EXIT

step "engine" engine_start || die "no docker engine (log: $SHIMMY_WORK/dockerd.log)"
step "base image $SHIMMY_BASE_IMAGE" base_image || die "base image"
step "wheels + images" images || die "image build"
step "C image" bash "$REPO/deploy/scripts/build-c-image.sh" || die "C image build"
step "compose v2" compose_v2 || die "Compose v2"

[ "${SHIMMY_CI_BUILD_ONLY:-0}" = 1 ] && { log "SHIMMY_CI_BUILD_ONLY=1: images built, tests not run"; exit 0; }

# the compose test runs deploy/compose/up.sh itself, which finds what this run set up
export SHIMMY_TEST_DAEMON_IMAGE="$SHIMMY_DAEMON_IMAGE" SHIMMY_TEST_APP_IMAGE="$SHIMMY_APP_IMAGE" \
       SHIMMY_TEST_C_IMAGE="$SHIMMY_C_IMAGE" \
       SHIMMY_TEST_WORK="$SHIMMY_WORK/tests" SHIMMY_TEST_REQUIRE_DOCKER=1
mkdir -p "$SHIMMY_TEST_WORK"
cd "$REPO"
rc=0
step "pytest tests/containers" timeout -k 10 1500 "$PYTHON" -m pytest -p no:cacheprovider tests/containers -m container "$@" || rc=$?
[ $rc = 5 ] && log "pytest collected no container test"
exit $rc
