#!/bin/bash
# The daemon and app images without any registry: the engine (started if none answers), the
# Python base image from this machine's Debian files, wheels built here, `docker build --network
# none`.  Prints the image names.  Kubernetes users then tag/push them (docs/containers.md).
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
step "engine" engine_start || die "no Docker engine (log: $SHIMMY_WORK/dockerd.log)"
step "base image" base_image || die "base image"
step "images" images || die "image build"
echo "$SHIMMY_DAEMON_IMAGE $SHIMMY_APP_IMAGE"
