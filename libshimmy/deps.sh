#!/bin/bash
# Install what libshimmy builds with (a C compiler, make, msgpack-c's headers), the way
# tools/venv.sh installs the C extension's build tools: with apt-get when running as root,
# otherwise by naming the command to run.  Idempotent.
set -euo pipefail
say() { printf 'libshimmy: %s\n' "$*" >&2; }
missing=()
command -v cc >/dev/null 2>&1 || missing+=(gcc)
command -v make >/dev/null 2>&1 || missing+=(make)
[ -f /usr/include/msgpack.h ] || missing+=(libmsgpack-dev)
[ -f /usr/include/jansson.h ] || missing+=(libjansson-dev)   # shimmy-c's conformance commands
[ "${#missing[@]}" -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  say "installing ${missing[*]} with apt-get, to build libshimmy and shimmy-c"
  export DEBIAN_FRONTEND=noninteractive
  if ! timeout 600 apt-get install -y -q "${missing[@]}" >/dev/null 2>&1; then
    timeout 300 apt-get update -q >/dev/null 2>&1 || true
    timeout 600 apt-get install -y -q "${missing[@]}" >/dev/null
  fi
else
  say "missing ${missing[*]}: run this once, then make again:"
  say "    sudo apt-get install -y ${missing[*]}"
  exit 1
fi
