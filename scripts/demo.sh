#!/usr/bin/env bash
# Compile the bundled example MoE model for this machine, run it, verify it against the
# numpy reference and print its latency.
set -euo pipefail
cd "$(dirname "$0")/.."
MOEC=.venv/bin/moec
MODEL=examples/mixtral_tiny.onnx
OUT=build/mixtral_tiny.host

$MOEC inspect "$MODEL"
$MOEC compile "$MODEL" --target host -o "$OUT" --force
$MOEC run "$OUT" --tokens 8
$MOEC verify "$MODEL" "$OUT" --tokens 1 --tokens 8 --tokens 33
