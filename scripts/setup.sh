#!/usr/bin/env bash
# Sets up everything moec needs on a fresh Debian/Ubuntu machine with Python 3.11:
# a virtual environment in .venv with moec and its pinned dependencies (and the dev
# extras: pytest, ruff, onnxruntime; cuda12: the CUDA 12.6 ptxas for Jetson cubins).
# Safe to rerun; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "setup: moec needs Python 3.11 (found $("$PYTHON" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
if ! "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
  else
    echo "setup: Python's venv module is missing; install python3-venv" >&2
    exit 1
  fi
fi
if ! command -v cc >/dev/null 2>&1; then
  # TVM links compiled libraries with the system C compiler.
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq g++ >/dev/null
  else
    echo "setup: a C compiler is needed to link libraries; install g++" >&2
    exit 1
  fi
fi
# Cross-compiling for the aarch64 boards (cortex-a72, cortex-a76, orin) and running their
# artifacts here under emulation: moec compile/run/verify/package, and their tests.
missing=""
command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || missing="$missing g++-aarch64-linux-gnu"
command -v qemu-aarch64 >/dev/null 2>&1 || missing="$missing qemu-user"
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq $missing >/dev/null
  else
    echo "setup: warning: building and emulating aarch64 artifacts needs$missing; install them as root" \
      "(apt-get install$missing); continuing without (their tests are skipped)" >&2
  fi
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.moec-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  # cuda12: CUDA 12.6 ptxas for Jetson Orin cubins (nvcc itself comes from the CUDA toolkit).
  .venv/bin/python -m pip install --quiet -e '.[dev,cuda12]'
  touch "$stamp"
fi
# TVM's runtime libraries for the boards' architectures, from PyPI's wheels, fetched once into
# .cache/ so that running cross-compiled artifacts (and the tests) needs no network later.
.venv/bin/python -m moec.runtime.wheels >/dev/null ||
  echo "setup: warning: continuing without TVM's aarch64 runtime; aarch64 artifacts cannot run here" >&2
