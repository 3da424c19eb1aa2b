#!/bin/bash
# Compose v2 on deploy/compose/compose.yaml with what deploy/compose/up.sh built:
#
#   deploy/compose/compose.sh ps
#   deploy/compose/compose.sh logs shimmyd
#   deploy/compose/compose.sh exec shimmyd shimmy ls
#   deploy/compose/compose.sh up -d --no-build --force-recreate subscriber publisher
#
# (Compose v2 found or installed as in deploy/scripts/lib.sh; COMPOSE_PROJECT_NAME as for up.sh.)
set -euo pipefail
# shellcheck source=../scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
compose_v2 2>/dev/null || die "Compose v2 not found (run deploy/compose/up.sh once)"
export COMPOSE_PROJECT_NAME="${COMPOSE_PROJECT_NAME:-shimmy}"
compose_run "$@"
