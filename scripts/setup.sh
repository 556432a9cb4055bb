#!/usr/bin/env bash
# Sets up everything moec needs on a fresh Debian/Ubuntu machine with CPython 3.10 to 3.14:
# the Debian packages below (installed with apt-get when run as root), then a virtual environment
# in .venv with moec and its pinned dependencies (and the dev extras: pytest, ruff, onnxruntime;
# cuda: NVRTC 12.6 and its CUDA headers, for Jetson cubins), then TVM's aarch64 runtime in
# .cache/.
# Debian packages: python3.X-venv (for the Python used, if its venv module is missing), g++ (TVM
# links compiled libraries with it), g++-aarch64-linux-gnu and qemu-user (cross-compiling for the
# aarch64 boards and running their artifacts here under emulation).
# Prints one line per step with its time. Safe to rerun; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

step_start=0
begin() {  # begin WHAT: say what the step does, before it runs (the line ends with its time)
  printf 'setup: %s ...' "$1"
  step_start=$(date +%s%N)
}
end() {  # end [RESULT]: finish the step's line with RESULT (default "done") and the time it took
  awk -v ns=$(( $(date +%s%N) - step_start )) -v result="${1:-done}" \
    'BEGIN { printf " %s (%.1fs)\n", result, ns / 1e9 }'
}

# The CPython versions moec supports (pyproject.toml's requires-python: those of apache-tvm 0.27).
SUPPORTED='import sys; v = sys.version_info; sys.exit(not ((3, 10) <= v[:2] <= (3, 14) and v[:3] != (3, 14, 1)))'
if [ -x .venv/bin/python ]; then
  PYTHON=.venv/bin/python
else
  found=""
  for candidate in ${PYTHON:-python3 python3.14 python3.13 python3.12 python3.11 python3.10}; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "$SUPPORTED" 2>/dev/null; then
      found=$candidate
      break
    fi
  done
  if [ -z "$found" ] && [ -n "${PYTHON:-}" ]; then
    echo "setup: moec needs CPython 3.10 to 3.14 (not 3.14.1); PYTHON=$PYTHON is" \
      "$( (command -v "$PYTHON" >/dev/null && "$PYTHON" --version 2>&1) || echo "not found")" >&2
    exit 1
  elif [ -z "$found" ]; then
    echo "setup: moec needs CPython 3.10 to 3.14 (not 3.14.1); python3 is not one and no python3.10" \
      "... python3.14 was found; set PYTHON=/path/to/python3.X" >&2
    exit 1
  fi
  PYTHON=$found
fi
version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')

# Debian packages: the required ones stop setup when they cannot be installed, the aarch64 ones
# only skip what needs them.
required=""
optional=""
if [ ! -x .venv/bin/python ] && ! "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then
  required="$required python$version-venv"
fi
command -v cc >/dev/null 2>&1 || required="$required g++"
command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || optional="$optional g++-aarch64-linux-gnu"
command -v qemu-aarch64 >/dev/null 2>&1 || optional="$optional qemu-user"
missing="$required$optional"
if [ -z "$missing" ]; then
  echo "setup: Debian packages: none to install (a C compiler, aarch64-linux-gnu-g++ and qemu-aarch64 are there)"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  begin "installing Debian packages with apt-get:$missing"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # shellcheck disable=SC2086  # one word per package
  apt-get install -y -qq $missing >/dev/null
  end
elif [ -n "$required" ]; then
  echo "setup: moec needs the Debian packages$required; install them as root (apt-get install$required)" >&2
  exit 1
else
  echo "setup: warning: building and emulating aarch64 artifacts needs$optional; install them as root" \
    "(apt-get install$optional); continuing without (their tests are skipped)" >&2
fi

if [ ! -x .venv/bin/python ]; then
  begin "creating .venv with $("$PYTHON" --version 2>&1) ($(command -v "$PYTHON"))"
  "$PYTHON" -m venv .venv
  end
fi
stamp=.venv/.moec-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  begin "installing moec (editable) and its pinned dependencies into .venv with pip"
  .venv/bin/python -m pip install --quiet --upgrade pip
  # cuda: NVRTC 12.6, the CUDA 12.6 headers and TVM's CUDA 13 runtime: CUDA targets, no CUDA toolkit.
  # setuptools warns at length that folders named like the package may shadow it; moec/ is it.
  PYTHONWARNINGS="ignore:Editable installation" .venv/bin/python -m pip install --quiet -e '.[dev,cuda]'
  touch "$stamp"
  end
else
  echo "setup: .venv ($(.venv/bin/python --version 2>&1)) has moec and its dependencies"
fi

# TVM's runtime libraries for the boards' architectures, from PyPI's wheels, fetched once into
# .cache/ so that running cross-compiled artifacts (and the tests) needs no network later.
begin "TVM's runtime for the aarch64 boards in ${MOEC_CACHE:-.cache/}"
if .venv/bin/python -m moec.runtime.wheels >/dev/null; then
  end
else
  end "failed"
  echo "setup: warning: continuing without TVM's aarch64 runtime; aarch64 artifacts cannot run here" >&2
fi
