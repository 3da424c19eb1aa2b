#!/bin/bash
# Make the project's virtual environment, for `make demo` / `make test`.
#
#   bash tools/venv.sh PYTHON VENV
#
# PYTHON is the interpreter to build it from (>= 3.10; default python3), VENV the folder (default
# .venv).  Nothing is installed outside VENV, except one distribution package when the
# interpreter cannot make virtual environments: on Debian and Ubuntu `python3 -m venv` needs
# python3.X-venv, which this script installs with apt-get when it runs as root, and otherwise
# names the exact command to run.  Idempotent: a working VENV is left as it is.
set -euo pipefail

PY="${1:-python3}"
VENV="${2:-.venv}"

say() { printf 'venv: %s\n' "$*" >&2; }

if ! command -v "$PY" >/dev/null 2>&1; then
  say "no '$PY' on PATH: install Python 3.10 or newer (Debian/Ubuntu: apt-get install -y python3 python3-venv)"
  exit 1
fi
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  say "$("$PY" -V 2>&1) is too old: Shimmy needs Python 3.10 or newer (make ... PYTHON=python3.11)"
  exit 1
fi
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
  exit 0
fi

# `python3 -m venv` needs ensurepip; Debian and Ubuntu ship it in a separate package.
if ! "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  ver="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
  pkg="python${ver}-venv"
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "$PY cannot make virtual environments: installing $pkg with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    if ! timeout 600 apt-get install -y -q "$pkg" >/dev/null 2>&1; then
      timeout 300 apt-get update -q >/dev/null
      timeout 600 apt-get install -y -q "$pkg" >/dev/null
    fi
  else
    say "$PY cannot make virtual environments (no ensurepip). Run this once, then again make:"
    say "    sudo apt-get install -y $pkg"
    exit 1
  fi
fi

rm -rf "$VENV"   # a half-made one (from a failed earlier attempt) would be reused otherwise
say "creating $VENV with $("$PY" -V 2>&1) ($(command -v "$PY"))"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip \
  || say "could not upgrade pip in $VENV; going on with its own"

# The ring's per-message paths are a C extension (shimmy/_ringcore.c), built by pip when a C
# compiler and this interpreter's headers (Python.h) exist; without them Shimmy installs anyway
# and runs the Python versions, several times slower per message (docs/performance.md).  As
# root with apt-get, install what is missing: gcc, and the distribution's python3.X-dev when the
# interpreter is the distribution's.
include="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
missing=()
command -v cc >/dev/null 2>&1 || missing+=(gcc)
if [ ! -f "$include/Python.h" ]; then
  case "$include" in
    /usr/include/*) missing+=("$(basename "$include")-dev") ;;
  esac
fi
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing ${missing[*]} with apt-get, to build the C fast paths"
    export DEBIAN_FRONTEND=noninteractive
    if ! timeout 600 apt-get install -y -q "${missing[@]}" >/dev/null 2>&1; then
      timeout 300 apt-get update -q >/dev/null 2>&1 || true
      timeout 600 apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 \
        || say "could not install ${missing[*]}: Shimmy will run its Python paths"
    fi
  else
    say "no C compiler or no Python.h: Shimmy will run its Python paths (to build the C ones:"
    say "    sudo apt-get install -y ${missing[*]}, then make clean and make again)"
  fi
fi
