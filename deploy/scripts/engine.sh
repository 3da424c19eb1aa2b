#!/bin/bash
# deploy/scripts/engine.sh start|stop
#   start: use the Docker engine that answers, else install Debian's docker.io and start dockerd
#          --bridge=none --iptables=false in the background (pid and log in $SHIMMY_WORK);
#   stop:  stop the dockerd that `start` started (by the pid it recorded), nothing else.
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
case "${1:-}" in
  start) step "engine" engine_start ;;
  stop) engine_stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
