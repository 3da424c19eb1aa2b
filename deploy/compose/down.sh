#!/bin/bash
# Stop what deploy/compose/up.sh started: the compose project (SIGTERM to the daemon, which
# removes its rings and exits 0) and its volume.  The images stay (SHIMMY_REMOVE_IMAGES=1 removes
# the three this path built); so do the Docker engine (`deploy/scripts/engine.sh stop` stops one
# the scripts started) and the scratch folder $SHIMMY_WORK (default /tmp/shimmy-deploy: wheels,
# build context, Compose v2 venv).
set -euo pipefail
# shellcheck source=../scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
compose_v2 2>/dev/null || die "Compose v2 not found"
export COMPOSE_PROJECT_NAME="${COMPOSE_PROJECT_NAME:-shimmy}"
COMPOSE=(timeout 120 "${COMPOSE[@]}")
compose_run down -v --remove-orphans -t 10
if [ "${SHIMMY_REMOVE_IMAGES:-0}" = 1 ]; then
  $DOCKER rmi "$SHIMMY_APP_IMAGE" "$SHIMMY_DAEMON_IMAGE" "${SHIMMY_BASE_IMAGE:-shimmy-base:py$(host_pyv)}" || true
fi
log "stopped project $COMPOSE_PROJECT_NAME; left: images ($SHIMMY_DAEMON_IMAGE, $SHIMMY_APP_IMAGE, base), $SHIMMY_WORK"
