#!/bin/bash
# The C application image (deploy/docker/Dockerfile.c) without any registry: the engine and the
# base image as build-images.sh makes them, libshimmy's examples built here (make -C libshimmy),
# `docker build --network none` from a context holding only the two binaries.  Prints the image
# name (SHIMMY_C_IMAGE, default shimmy-c-app:<project version>).
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
SHIMMY_C_IMAGE="${SHIMMY_C_IMAGE:-shimmy-c-app:$SHIMMY_VERSION}"
step "engine" engine_start || die "no Docker engine (log: $SHIMMY_WORK/dockerd.log)"
step "base image" base_image || die "base image"
c_image() {
  bash "$SHIMMY_REPO/libshimmy/deps.sh" || return 1
  make -s -C "$SHIMMY_REPO/libshimmy" build/examples/publisher build/examples/subscriber || return 1
  local ctx="$SHIMMY_WORK/c-context"
  rm -rf "$ctx"; mkdir -p "$ctx"
  cp "$SHIMMY_REPO"/libshimmy/build/examples/publisher "$SHIMMY_REPO"/libshimmy/build/examples/subscriber \
     "$SHIMMY_REPO"/deploy/docker/Dockerfile.c "$ctx/"
  timeout 600 $DOCKER build -q --network none --build-arg BASE_IMAGE="$SHIMMY_BASE_IMAGE" \
    --label "$SHIMMY_IMAGE_LABEL" -f "$ctx/Dockerfile.c" -t "$SHIMMY_C_IMAGE" "$ctx" >/dev/null
}
step "C image" c_image || die "C image build"
echo "$SHIMMY_C_IMAGE"
