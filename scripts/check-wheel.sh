#!/usr/bin/env bash
# Checks the package a user installs, not the editable checkout: builds moec's wheel, installs it
# (not editable) into a fresh virtual environment with the dependency versions of .venv, and from
# a folder outside the repo lists the bundled targets and compiles and verifies the example for
# host and cortex-a72 (run under qemu-aarch64). `make test` runs it, so CI does. Needs .venv and
# TVM's aarch64 runtime in .cache/ (or $MOEC_CACHE), both from scripts/setup.sh. About 2 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
work=$(mktemp -d "${TMPDIR:-/tmp}/moec-check-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT
log=$work/log
export MOEC_CACHE="${MOEC_CACHE:-$repo/.cache}"
unset PYTHONPATH
model=$repo/examples/mixtral_tiny.onnx
total_start=$(date +%s%N)

seconds_since() {  # seconds_since START_NS: the time since START_NS, e.g. "12.3s"
  awk -v ns=$(( $(date +%s%N) - $1 )) 'BEGIN { printf "%.1fs", ns / 1e9 }'
}

fail() {  # fail WHAT: say what failed, show the end of its output, stop
  echo "check-wheel: FAILED: $1" >&2
  [ -s "$log" ] && tail -n 30 "$log" | sed 's/^/check-wheel:   | /' >&2
  exit 1
}

step() {  # step WHAT COMMAND...: run COMMAND with its output in $log; one line with its time
  local what=$1 start status
  shift
  start=$(date +%s%N)
  # Not `COMMAND || fail`: bash ignores `set -e` inside a command that is the left side of `||`.
  set +e
  (set -e; "$@") >"$log" 2>&1
  status=$?
  set -e
  [ "$status" = 0 ] || fail "$what"
  echo "check-wheel: $what ($(seconds_since "$start"))"
}

build_wheel() {
  # Built from a copy of what the wheel is made of: an in-tree build keeps build/lib/ between
  # runs, and a module removed from moec/ since would still ship.
  mkdir "$work/src"
  cp -r pyproject.toml README.md moec targets schedules "$work/src/"
  find "$work/src" -name __pycache__ -type d -prune -exec rm -rf {} +
  .venv/bin/python -m pip wheel --no-deps --wheel-dir "$work/dist" "$work/src"
}

check_wheel_contents() {
  # Every module of moec/ and every bundled TOML file is in the wheel: pyproject.toml lists the
  # packages by hand (the bundled folders are mapped in), so a new subpackage must be added there.
  .venv/bin/python - "$work"/dist/moec-*.whl <<'EOF'
import sys
import zipfile
from pathlib import Path

shipped = set(zipfile.ZipFile(sys.argv[1]).namelist())
wanted = {str(p) for p in Path("moec").rglob("*.py") if "__pycache__" not in p.parts}
for folder in ("targets", "schedules"):
    wanted |= {f"moec/bundled_{folder}/{p.name}" for p in Path(folder).glob("*.toml")}
missing = sorted({Path(path).parent for path in wanted - shipped})
for folder in missing:
    package = ".".join(folder.parts)
    print(f"the wheel lacks {folder}/: add '{package}' to [tool.setuptools] packages in pyproject.toml")
sys.exit(1 if missing else 0)
EOF
}

install_wheel() {
  # The versions .venv has (pinned, or resolved by setup.sh), so pip takes them from its cache;
  # only name==version lines (pip refuses a constraint that is a file or URL). --no-compile:
  # byte-compiling every module of the dependencies takes as long as installing them.
  .venv/bin/python -m pip freeze --exclude-editable | grep -E '^[A-Za-z0-9._-]+==' >"$work/constraints.txt"
  .venv/bin/python -m venv "$work/venv"
  "$work/venv/bin/python" -m pip install --quiet --no-compile --constraint "$work/constraints.txt" "$work"/dist/moec-*.whl
}

check_installed_moec() {
  # Run from outside the repo so that nothing of the checkout can be imported by accident.
  local where listing file name
  where=$("$work/venv/bin/python" -c 'import moec, sys; sys.stdout.write(moec.__file__)')
  echo "moec imported from $where"
  case "$where" in
    "$repo"/*) echo "moec was imported from the checkout, not from the installed wheel"; return 1 ;;
  esac
  listing=$("$work/venv/bin/moec" targets)
  echo "$listing"
  for file in "$repo"/targets/*.toml; do
    name=$(basename "$file" .toml)
    grep -q "^$name " <<<"$listing" || { echo "moec targets does not list $name"; return 1; }
  done
}

compile_and_verify() {  # compile_and_verify TARGET
  "$work/venv/bin/moec" compile "$model" --target "$1" -o "$1"
  "$work/venv/bin/moec" verify "$model" "$1"
}

mkdir "$work/run"
step "built the wheel" build_wheel
step "the wheel holds every module of moec/ and every bundled target and schedule" check_wheel_contents
step "installed $(basename "$work"/dist/moec-*.whl) into a fresh venv" install_wheel
cd "$work/run"
step "moec targets lists the bundled targets (from $PWD)" check_installed_moec
step "compiled and verified the example for host" compile_and_verify host
if command -v aarch64-linux-gnu-g++ >/dev/null && command -v qemu-aarch64 >/dev/null; then
  step "compiled and verified the example for cortex-a72 (under qemu-aarch64)" compile_and_verify cortex-a72
elif [ -n "${CI:-}" ]; then
  fail "cortex-a72 needs aarch64-linux-gnu-g++ and qemu-aarch64 (scripts/setup.sh installs them as root)"
else
  echo "check-wheel: warning: skipped cortex-a72: no aarch64-linux-gnu-g++ or qemu-aarch64 (setup.sh installs them as root)" >&2
fi
step "removed the fresh venv" rm -rf "$work/venv"
echo "check-wheel: passed in $(seconds_since "$total_start")"
